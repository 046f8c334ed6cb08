"""CaptionModule: the thin LightningModule around a `Captioner` (loss, optimiser, metrics, logging)."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics import MaxMetric

from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.metrics.cider import cider_d_scores, document_frequencies
from imcap.metrics.coco import CaptionMetrics
from imcap.metrics.grounding import GroundingRate
from imcap.models.captioner import CHECKPOINT_KEY, Caption, attach_memory_for, build_captioner
from imcap.models.ensemble import decoder_members
from imcap.models.rerank import NeighbourMemory
from imcap.models.search import Decoding
from imcap.training.losses import caption_cross_entropy, doubly_stochastic_penalty
from imcap.training.scheduled_sampling import ScheduledSampling, scheduled_sampling_forward
from imcap.training.scst import SCST, scst_loss

# A frozen encoder stays in eval mode on purpose (fixed BatchNorm statistics).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


log = logging.getLogger(__name__)
HOST_LENGTHS = "host_lengths"  # the batch's `lengths` (<bos> .. <eos> per caption) left on the host


def host_target_lengths(batch: dict) -> torch.Tensor | None:
    """(B,) targets per caption (its tokens after <bos>) on the host, or None if the batch
    did not come through `transfer_batch_to_device`."""
    host = batch.get(HOST_LENGTHS)
    return host - 1 if host is not None else None


class CaptionModule(pl.LightningModule):
    """Teacher-forced cross-entropy (then optionally SCST) training; val and test decode with
    `decoding` (greedy or beam search) and score with the registered metrics (imcap.metrics.coco)
    named in `val_metrics` / `test_metrics`.

    `architecture` holds the encoder/decoder/attention/embedding configs and is stored in every
    checkpoint together with the vocabulary, so a checkpoint alone rebuilds the model.
    `optimizer` / `scheduler` are Hydra configs with `_partial_: true`. The keyword-only
    arguments are the `model.*` options of conf/model/captioner.yaml (MODULE_OPTIONS); a None
    builds the YAML's default (`decoding`, `scst`, `scheduled_sampling`) or means none (`scheduler`).
    """

    def __init__(
        self,
        architecture: dict,
        vocab: list[str],
        image_size: int,
        pretrained: bool = True,
        data_config: dict | None = None,
        eval_prefix: str = "test",
        *,  # from here: the model.* options of conf/model/captioner.yaml, whose defaults these equal
        optimizer: dict,
        scheduler: dict | None = None,
        encoder_lr: float | None = 1.0e-4,
        label_smoothing: float = 0.0,
        feature_dropout: float = 0.0,
        attention_reg: float = 1.0,
        decoding: dict | None = None,
        val_metrics: Sequence[str] = ("BLEU", "ROUGE-L", "CIDEr-D"),
        test_metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D"),
        monitor: str = "CIDEr-D",
        scst: dict | None = None,
        scheduled_sampling: dict | None = None,
        compile: bool | dict = False,
    ):
        super().__init__()
        self.vocab = Vocabulary(vocab)
        self.captioner = build_captioner(architecture, self.vocab, image_size, pretrained=pretrained)
        self.optimizer_cfg, self.scheduler_cfg = optimizer, scheduler
        self.encoder_lr = encoder_lr
        self.label_smoothing, self.attention_reg = label_smoothing, attention_reg
        if not 0.0 <= feature_dropout < 1.0:
            raise ImcapError(f"model.feature_dropout={feature_dropout!r}; use a probability in [0, 1)")
        self.feature_dropout = feature_dropout  # on the image features, in cross-entropy training
        self.decoding = Decoding(**(decoding or {}))
        self.captioner.decoding = self.decoding
        self.data_config = data_config  # stored in checkpoints so eval can rebuild the data
        self.val_metrics = CaptionMetrics(list(val_metrics))
        self.test_metrics = CaptionMetrics(list(test_metrics))  # METEOR/SPICE skipped with a note when unavailable
        self.monitor = monitor  # logged as val/<monitor>_best; checkpoints select on val/<monitor>
        self.scst = SCST(**(scst or {}))
        self.scheduled_sampling = ScheduledSampling(**(scheduled_sampling or {}))
        self._cider_frequencies = None  # document frequencies of the training captions (SCST reward)
        self.test_grounding = GroundingRate()
        self.val_best = MaxMetric()
        self.val_best.persistent(True)  # the best score survives a resume from checkpoint
        self.eval_prefix = eval_prefix  # metric prefix of the test loop: test/BLEU-4 or val/BLEU-4
        self.predictions: list[dict[str, Any]] = []  # test predictions, COCO results format
        self.wandb_run_id: str | None = None  # set by train.py when logging to W&B
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if stage == "fit" and hasattr(datamodule, "one_caption_per_image_from"):
            # SCST scores each sample against all of an image's references: an epoch of SCST
            # visits every image once, not once per caption. The train loader is then rebuilt
            # each epoch, so Lightning counts the SCST epochs' batches anew.
            datamodule.one_caption_per_image_from = self.scst.start_epoch
            if self.scst.start_epoch is not None:
                self.trainer.reload_dataloaders_every_n_epochs = 1
        if stage == "fit" and self.compile_options is not None:
            # in place: parameter names (and checkpoints) stay as they are; each decoder
            # compiles its hot path (the recurrent step, or the transformer's forward)
            self.captioner.decoder.compile_steps(**self.compile_options)

    def on_train_epoch_start(self) -> None:
        # SCST's own learning rate, set anew each SCST epoch (so also after a resume): the
        # epoch scheduler still steps, and its value is simply not used from here on
        if self.scst.active(self.current_epoch) and self.scst.lr is not None:
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.scst.lr

    # -- forward pieces -----------------------------------------------------------------------
    def features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "grid" in batch:  # cached rows (B, N, C): the grid (and pooled, where not its mean)
            return self.captioner.encoder.from_cache(batch["grid"])
        return self.captioner.encode(batch["images"])

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """The training loss and its parts. An ensemble (`model.ensemble`) sums its members'
        losses, so each member gets the gradient it would get alone; the parts are their means."""
        tokens = batch["tokens"]  # (B, L): <bos> w1 .. wn <eos> <pad>..
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        grid, pooled = self.features(batch)
        if self.training and self.feature_dropout > 0:  # the decoder cannot learn one image's exact grid
            grid = F.dropout(grid, self.feature_dropout)  # (B, N, C)
            pooled = F.dropout(pooled, self.feature_dropout)  # (B, C)
        lengths = host_target_lengths(batch)  # (B,) no compute on padding, planned on the host
        if lengths is None:
            lengths = (targets != self.vocab.pad_id).sum(dim=1)
        parts = [self.decoder_loss(member, grid, pooled, inputs, targets, lengths)
                 for member in decoder_members(self.captioner.decoder)]
        if len(parts) == 1:
            return parts[0]
        out = {name: torch.stack([p[name] for p in parts]).mean() for name in parts[0]}
        out["loss"] = torch.stack([p["loss"] for p in parts]).sum()
        return out

    def decoder_loss(self, decoder: torch.nn.Module, grid: torch.Tensor, pooled: torch.Tensor,
                     inputs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy (+ the attention regulariser) of one decoder on inputs/targets (B, T)."""
        probability = self.scheduled_sampling.probability(self.current_epoch) if self.training else 0.0
        if probability > 0:
            logits, weights = scheduled_sampling_forward(decoder, grid, pooled, inputs, probability)
        else:
            logits, weights = decoder(grid, pooled, inputs, lengths)  # (B, T, V), (B, T, N)
        xe = caption_cross_entropy(logits, targets, self.vocab.pad_id, self.label_smoothing)
        out = {"loss": xe, "xe": xe}
        if weights is not None and self.attention_reg > 0:
            penalty = doubly_stochastic_penalty(weights, targets != self.vocab.pad_id)
            out["attention_reg"] = penalty
            out["loss"] = xe + self.attention_reg * penalty
        beta = getattr(decoder, "last_beta", None)
        if beta is not None:  # adaptive attention: the sentinel's share per word, "how much not to look"
            valid = targets != self.vocab.pad_id
            out["beta"] = (beta * valid).sum() / valid.sum()  # the mean over words, without a boolean index (a sync)
        return out

    def decode(self, batch: dict) -> list[str]:
        return [c.text for c in self.decode_captions(batch)]

    def decode_captions(self, batch: dict) -> list[Caption]:
        """Generated captions with their words and per-word attention maps."""
        return self.captioner.to_captions(self.captioner.generate(*self.features(batch), self.decoding))

    # -- Lightning hooks ----------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Lightning's copy (`non_blocking=True` to a GPU, from the pinned batches of
        `data.pin_memory`), keeping the collated caption lengths on the host as well: the
        decoders plan their per-step loop from them without reading the device back."""
        host = batch.get("lengths") if isinstance(batch, dict) else None
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if isinstance(host, torch.Tensor) and host.device.type == "cpu":
            batch[HOST_LENGTHS] = host
        return batch

    def scst_reward(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> torch.Tensor:
        """CIDEr-D of each candidate, with document frequencies of the training captions."""
        if self._cider_frequencies is None:
            self._cider_frequencies = document_frequencies(self.trainer.datamodule.datasets["train"].references)
        return torch.tensor(cider_d_scores(candidates, references, frequencies=self._cider_frequencies))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        bs = batch["tokens"].shape[0]
        if self.scst.active(self.current_epoch):
            losses = scst_loss(self.captioner.decoder, *self.features(batch), batch["references"], self.vocab,
                               self.scst_reward, self.scst, self.decoding)
            for name, value in losses.items():
                self.log(f"train/scst_{name}" if name != "loss" else "train/loss", value, prog_bar=True, batch_size=bs)
            self.stop_if_diverged("loss", losses["loss"])
            return losses["loss"]
        losses = self.loss(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=bs)
        self.stop_if_diverged("loss", losses["loss"])
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # float16's GradScaler skips a step with non-finite gradients and lowers its scale
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:  # one fused norm per device and dtype, then one sync: a NaN anywhere makes the total NaN
            self.stop_if_diverged("gradient norm", torch.linalg.vector_norm(torch.stack(
                [n.to(grads[0].device, torch.float32) for n in torch._foreach_norm(grads)])))

    def stop_if_diverged(self, what: str, value: torch.Tensor) -> None:
        """A non-finite loss or gradient ends the run with one line. Going on would spread the NaN
        to every weight (clipping divides by a NaN norm), and NaN logits still decode to a finite,
        near-zero CIDEr-D that early stopping and best.ckpt would take as a real score."""
        if not bool(torch.isfinite(value)):
            raise ImcapError(diverged(self.trainer, f"the {what} is {float(value.detach())}"))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        bs = batch["tokens"].shape[0]
        self.log("val/loss", self.loss(batch)["xe"], batch_size=bs, sync_dist=True)
        self.val_metrics.update(batch["image_ids"], self.decode(batch), batch["raw_references"])

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metrics.compute()  # synced across ranks, each image once
        self.val_metrics.reset()
        for name, value in scores.items():
            self.log(f"val/{name}", value.float(), prog_bar=name in ("BLEU-4", "CIDEr-D"))
        if not self.trainer.sanity_checking and self.monitor in scores:
            self.val_best.update(scores[self.monitor].float())
            self.log(f"val/{self.monitor}_best", self.val_best.compute())

    def on_validation_epoch_start(self) -> None:
        # while training, an encoder that learns moves the memory's features: built anew
        self.prepare_memory(refresh=self.trainer.state.fn == "fit")

    def on_test_epoch_start(self) -> None:
        self.predictions = []
        self.prepare_memory(refresh=False)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        attach_memory_for(self, checkpoint["state_dict"])  # sized, before Lightning's strict load

    def prepare_memory(self, refresh: bool) -> None:
        """Build consensus reranking's neighbour memory (`imcap.models.rerank`) from the training
        images, where decoding.rerank_neighbours is set and the captioner has none yet (a
        checkpoint's is kept), or anew on `refresh` when the encoder trains. Also under greedy
        decoding: the checkpoint then reranks when `imcap.caption` or the demo switch to beams."""
        if self.decoding.rerank_neighbours <= 0:
            return
        tuned = any(p.requires_grad for p in self.captioner.encoder.parameters())
        if self.captioner.memory is not None and not (refresh and tuned):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "memory_loader", None) is None:
            log.warning("decoding.rerank_neighbours=%d needs the training images one by one, which %s does not "
                        "give (streamed data): decoding without reranking", self.decoding.rerank_neighbours,
                        type(datamodule).__name__)
            self.decoding = replace(self.decoding, rerank_neighbours=0)
            self.captioner.decoding = self.decoding
            return
        self.captioner.memory = self.memory_from(datamodule.memory_loader())

    @torch.no_grad()
    def memory_from(self, loader: Iterable[dict]) -> NeighbourMemory:
        """The neighbour memory of the images in `loader` (one item per image, with `references`)."""
        pooled, captions = [], []
        for batch in loader:
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            pooled.append(self.features(batch)[1].float().cpu())  # (B, C)
            captions += [[self.vocab.encode(ref.split(), add_bos_eos=False) for ref in refs]
                         for refs in batch["references"]]
        memory = NeighbourMemory.build(torch.cat(pooled), captions, self.decoding.rerank_memory_images)
        return memory.to(self.device)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        generated = self.decode_captions(batch)
        captions = [c.text for c in generated]
        self.test_metrics.update(batch["image_ids"], captions, batch["raw_references"])
        self.predictions += [{"image_id": i, "caption": c, "index": int(k)}
                             for i, c, k in zip(batch["image_ids"], captions, batch["index"])]
        if generated and generated[0].attention is not None and any(batch.get("objects") or []):
            maps = torch.nn.utils.rnn.pad_sequence([c.attention for c in generated], batch_first=True)
            self.test_grounding.update([c.words for c in generated], maps, batch["objects"], batch["extents"],
                                       batch["index"])

    def on_test_epoch_end(self) -> None:
        for name, value in self.test_metrics.compute().items():
            self.log(f"{self.eval_prefix}/{name}", value.float())
        self.test_metrics.reset()
        self.predictions = gather_predictions(self.predictions)
        # only datasets with object boxes (the shapes demo) update grounding; computing it unupdated
        # warns. Any rank's update counts: compute() gathers from every rank, so all call it or none
        if self.trainer.strategy.reduce_boolean_decision(self.test_grounding.update_called, all=False):
            grounding = self.test_grounding.compute()
            if float(grounding["grounding_words"]) > 0:
                for name in ("grounding", "grounding_chance"):
                    self.log(f"{self.eval_prefix}/{name}", grounding[name].float())
        self.test_grounding.reset()

    def configure_optimizers(self):
        decoder_params = [p for p in self.captioner.decoder.parameters() if p.requires_grad]
        groups = [{"params": decoder_params}]
        encoder_params = [p for p in self.captioner.encoder.parameters() if p.requires_grad]
        if encoder_params:
            groups.append({"params": encoder_params,
                           **({"lr": self.encoder_lr} if self.encoder_lr is not None else {})})
        optimizer = _partial(self.optimizer_cfg)(groups)
        if not self.scheduler_cfg:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": _partial(self.scheduler_cfg)(optimizer), "interval": "epoch"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Trainer's gradient_clip_val, also with a fused optimiser under mixed precision (which
        Lightning refuses outright, since with a GradScaler it leaves such an optimiser's
        gradients scaled until the step: they are unscaled here first; bf16 has no scaler)."""
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # its step then sees the gradients as unscaled
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return
        members = decoder_members(self.captioner.decoder)
        if len(members) == 1:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        # each ensemble member's norm is clipped alone, as if it trained alone; then the rest
        in_members: set[int] = set()
        for member in members:
            ids = {id(p) for p in member.parameters()}
            in_members |= ids
            torch.nn.utils.clip_grad_norm_([p for p in params if id(p) in ids], gradient_clip_val)
        torch.nn.utils.clip_grad_norm_([p for p in params if id(p) not in in_members], gradient_clip_val)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "architecture": self.captioner.architecture,
            "vocab": list(self.vocab.itos),
            "image_size": self.captioner.image_size,
            "data": self.data_config,
            "decoding": self.decoding.to_config(),
            "wandb_run_id": self.wandb_run_id,
            "format": 1,
        }


def diverged(trainer: pl.Trainer, what: str) -> str:
    """The one line that says where training diverged and what to try."""
    lr = (getattr(trainer.lightning_module, "optimizer_cfg", None) or {}).get("lr")
    return (f"training diverged at step {trainer.global_step} (epoch {trainer.current_epoch}): {what}; try a "
            f"lower model.optimizer.lr{f' (now {lr:g})' if lr is not None else ''} or gradient clipping "
            f"(trainer.gradient_clip_val, now {trainer.gradient_clip_val})"
            + (f" or trainer.precision=32-true (now {trainer.precision})" if trainer.precision != "32-true" else ""))


def gather_predictions(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predictions of all ranks, each image once (DDP pads the last batch with repeats), in
    dataset order, in COCO results format."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, predictions)
        predictions = [p for rank in gathered for p in rank]
    unique = {p["index"]: p for p in predictions}
    return [{"image_id": unique[k]["image_id"], "caption": unique[k]["caption"]} for k in sorted(unique)]


def _partial(cfg: dict) -> partial:
    built = instantiate(cfg, _partial_=True)
    return built if isinstance(built, partial) else partial(built)


# The model.* options train.py passes to CaptionModule: its keyword-only arguments.
MODULE_OPTIONS = tuple(name for name, p in inspect.signature(CaptionModule).parameters.items()
                       if p.kind is inspect.Parameter.KEYWORD_ONLY)
