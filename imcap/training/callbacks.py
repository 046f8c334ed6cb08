"""Callbacks that training adds: the default config's, and `StayEarlyStopped`, which
`imcap.train` always adds."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason


class ReseedEveryStep(pl.Callback):
    """Seed every RNG from (seed, global step, rank) before each training batch.

    Dropout and any other randomness then depend only on the step, not on what ran before it
    (validation, data-loader set-up, a restart), so a run resumed from `last.ckpt` continues
    exactly as the uninterrupted run would have. Costs one `manual_seed` per batch.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        seed = (self.seed * 1_000_003 + trainer.global_step * 1009 + trainer.global_rank) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class WandbCaptionTable(pl.Callback):
    """Each validation epoch, log a `wandb.Table` of a fixed set of val images: the generated
    caption, the references, and the attention overlays per word. A no-op without W&B."""

    def __init__(self, num_images: int = 8):
        self.num_images = num_images

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        datamodule = getattr(trainer, "datamodule", None)
        if not loggers or trainer.sanity_checking or not trainer.is_global_zero or datamodule is None:
            return
        import wandb

        from imcap.data.dataset import collate
        from imcap.data.images import load_image
        from imcap.viz.attention import caption_attention_figure, figure_to_image

        dataset = datamodule.datasets["val"]
        if isinstance(dataset, torch.utils.data.IterableDataset):  # streamed shards: no random access
            return
        items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        batch = collate(items)
        batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            result = pl_module.captioner.generate(*pl_module.features(batch), pl_module.decoding)
        table = wandb.Table(columns=["image_id", "image", "caption", "references", "attention"])
        for item, caption in zip(items, pl_module.captioner.to_captions(result)):
            image = load_image(dataset.records[item["index"]].image_path)
            overlay = None
            if caption.attention is not None and caption.words:
                overlay = wandb.Image(figure_to_image(caption_attention_figure(image, caption.words, caption.attention)))
            table.add_data(str(item["image_id"]), wandb.Image(image), caption.text,
                           "\n".join(item["references"]), overlay)
        for lg in loggers:
            lg.experiment.log({"val/captions": table, "trainer/global_step": trainer.global_step})


class TrainTimer(pl.Callback):
    """Logs `train/captions_per_s`: captions over wall time of the training part of the epochs
    so far (validation, which Lightning runs inside the epoch, excluded). Captions are counted
    per batch, so loaders without a sampler (streamed shards) are timed too."""

    def __init__(self):
        self.seconds = 0.0
        self.captions = 0
        self._epoch_captions = 0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._epoch_captions += len(batch["tokens"])

    def _stop(self, trainer: pl.Trainer) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.captions += self._epoch_captions
            self._epoch_captions = 0
            self._start = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(trainer)
        if self.seconds > 0:
            pl_module.log("train/captions_per_s", self.captions / self.seconds)


class LinearWarmup(pl.Callback):
    """Ramps every parameter group's learning rate linearly up to its configured value over
    the first `steps` optimiser steps (large batches with a scaled-up rate diverge without
    it); from then on the scheduler alone sets it. The target is kept in the param group, so
    a run resumed mid-warmup continues the ramp."""

    def __init__(self, steps: int = 500):
        self.steps = steps

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.steps <= 0 or step > self.steps:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                target = group.setdefault("warmup_target_lr", group["lr"])
                group["lr"] = target * min(1.0, (step + 1) / self.steps)


class RunInterrupted(BaseException):
    """Training stopped on a signal after saving a resumable checkpoint. A BaseException, as
    KeyboardInterrupt is: no `except Exception` on the way takes it for a failed job."""

    def __init__(self, signum: int, checkpoint: str, step: int, epoch: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint, self.step, self.epoch = signum, checkpoint, step, epoch


class StopOnSignal(pl.Callback):
    """Ctrl-C (SIGINT) or SIGTERM while training: the batch in progress finishes, `path`
    (checkpoints/last.ckpt) is written with the position in the epoch, and fit ends with
    RunInterrupted, so that the entry point prints how to resume and exits 128 + the signal.

    Lightning alone turns Ctrl-C into exit status 1 with nothing saved since the last
    validation, and SIGTERM into exit status 0. last.ckpt, not a file of its own: it is what
    `ckpt_path=` resumes from anywhere else, and it is never older than another checkpoint
    beside it. SIGTERM stays Lightning's (its handler also drives SLURM's auto-requeue); this
    reads `trainer.received_sigterm`. A second Ctrl-C stops at once (Lightning's KeyboardInterrupt).
    """

    def __init__(self, path: str):
        self.path = path
        self.signum: int | None = None
        self._previous: object = None

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signal.SIGINT
        # os.write: a buffered stream written to from a signal handler may be mid-write already
        os.write(2, b"\nStopping after this batch to save a checkpoint (Ctrl-C again to stop at once)\n")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _received(self, trainer: pl.Trainer) -> int | None:
        signum = self.signum or (signal.SIGTERM if trainer.received_sigterm else 0)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # every rank stops after the same batch (the save is collective), even if the
            # signal reached them on either side of a batch end: one small all-reduce per step
            agreed = torch.tensor([int(signum)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
            signum = int(agreed.item())
        return signum or None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        signum = self._received(trainer)
        if signum is None or batch_idx + 1 >= trainer.num_training_batches:
            return  # after an epoch's last batch its validation runs first: stopped at its end
        self._stop(trainer, signum, batches_trained=batch_idx + 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        signum = self._received(trainer)
        if signum is not None:
            self._stop(trainer, signum, batches_trained=0)

    def _stop(self, trainer: pl.Trainer, signum: int, batches_trained: int) -> None:
        loaders = getattr(trainer.fit_loop._combined_loader, "flattened", [])
        for loader in loaders:  # where the resumed epoch starts (imcap.training.checkpoints.ResumableLoader)
            if hasattr(loader, "batches_trained"):
                loader.batches_trained = batches_trained
        try:
            trainer.save_checkpoint(self.path)  # atomic: the trainer's AtomicCheckpointIO
        finally:
            for loader in loaders:
                if hasattr(loader, "batches_trained"):
                    loader.batches_trained = 0
        raise RunInterrupted(signum, str(Path(self.path).resolve()), trainer.global_step, trainer.current_epoch)


class StayEarlyStopped(pl.Callback):
    """A run resumed from a checkpoint written after EarlyStopping stopped it (killed during its
    test) trains no further epoch: Lightning restores the callback's state but not the trainer's
    `should_stop`, and would train one more epoch before EarlyStopping stops it again."""

    resumed_stopped = False  # set when this fit trains nothing

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(isinstance(c, EarlyStopping) and c.stopping_reason != EarlyStoppingReason.NOT_STOPPED
               for c in trainer.callbacks):
            self.resumed_stopped = trainer.should_stop = True  # the fit loop ends before its first epoch
