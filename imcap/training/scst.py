"""Self-critical sequence training (Rennie et al. 2017) with a CIDEr-D reward.

Per image, k captions are sampled; each is rewarded with CIDEr-D against the image's
references, minus a baseline computed without gradients: the reward of the greedy caption
(self-critical) or the mean reward of the other k-1 samples ("new self-critical", Luo 2020).
The policy gradient flows through one teacher-forced pass over the sampled captions, so
sampling itself keeps no graph and memory stays that of one XE step over B*k captions.
Samples and the greedy baseline obey the same rules as evaluation (`Decoding`: no <unk> unless
allowed, min_length, no caption that ends on "a", "the", ...), so SCST optimises the captions
that are later scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.models.search import Decoding, decoding_rules, greedy_search, sample

RewardFn = Callable[[Sequence[str], Sequence[Sequence[str]]], torch.Tensor]  # -> (n,) rewards


@dataclass(frozen=True)
class SCST:
    """When and how to train with SCST; `start_epoch: null` keeps cross-entropy throughout."""

    start_epoch: int | None = None
    baseline: str = "greedy"  # greedy | mean
    num_samples: int = 5
    max_length: int = 16
    temperature: float = 1.0
    # learning rate of every parameter group in SCST epochs (null: the schedule's). Policy
    # gradients are far noisier than cross-entropy's: at the rate cosine decay has reached
    # when SCST starts (about 4e-4 in a 10-epoch run) SCST collapsed on Flickr8k-1k. A small
    # rate alone did not make it pay there (experiments/real_photo_recipe/).
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.baseline not in ("greedy", "mean"):
            raise ImcapError(f"model.scst.baseline={self.baseline!r}; choose greedy or mean")
        if self.temperature <= 0:
            raise ImcapError(f"model.scst.temperature={self.temperature}; it must be > 0 (SCST samples)")
        if self.num_samples < (2 if self.baseline == "mean" else 1):
            raise ImcapError(f"model.scst.num_samples={self.num_samples} is too small for the "
                             f"{self.baseline} baseline (mean needs at least 2)")
        if self.lr is not None and self.lr <= 0:
            raise ImcapError(f"model.scst.lr={self.lr}; it must be > 0, or null for the schedule's rate")

    def active(self, epoch: int) -> bool:
        return self.start_epoch is not None and epoch >= self.start_epoch


def scst_loss(
    decoder: nn.Module,
    grid: torch.Tensor,
    pooled: torch.Tensor,
    references: Sequence[Sequence[str]],
    vocab: Vocabulary,
    reward_fn: RewardFn,
    config: SCST,
    decoding: Decoding | None = None,
) -> dict[str, torch.Tensor]:
    """Policy-gradient loss for a batch: grid (B, N, C), pooled (B, C), references per image;
    captions obey `decoding`'s rules (default: `Decoding()`; its method, beam size and
    max_length are not used)."""
    B, K = grid.shape[0], config.num_samples
    expand = torch.arange(B, device=grid.device).repeat_interleave(K)  # (B*K,)
    g, p = grid.index_select(0, expand), pooled.index_select(0, expand)
    ids = (vocab.bos_id, vocab.eos_id, vocab.pad_id)
    rules = decoding_rules(vocab, decoding or Decoding())
    samples = sample(decoder, g, p, *ids, max_length=config.max_length,
                     temperature=config.temperature, **rules).tokens  # (B*K, L), no graph
    inputs = torch.cat([torch.full_like(samples[:, :1], vocab.bos_id), samples[:, :-1]], dim=1)
    mask = (samples != vocab.pad_id).float()  # words and <eos>; <pad> after it
    logits, _ = decoder(g, p, inputs, mask.sum(1).long())  # (B*K, L, V), with graph; none on padding
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, samples.unsqueeze(2)).squeeze(2)

    refs = [references[i] for i in expand.tolist()]
    rewards = reward_fn([vocab.decode_text(s) for s in samples.tolist()], refs).to(logp)  # (B*K,)
    with torch.no_grad():
        if config.baseline == "greedy":
            was_training = decoder.training
            decoder.eval()
            greedy = greedy_search(decoder, grid, pooled, *ids, max_length=config.max_length, **rules).tokens
            decoder.train(was_training)
            baseline = reward_fn([vocab.decode_text(s) for s in greedy.tolist()], references).to(logp)
            baseline = baseline.index_select(0, expand)
        else:
            per_image = rewards.view(B, K)
            baseline = ((per_image.sum(1, keepdim=True) - per_image) / (K - 1)).view(-1)
    advantage = (rewards - baseline).unsqueeze(1)  # (B*K, 1)
    loss = -(advantage * logp * mask).sum() / mask.sum().clamp_min(1.0)
    return {"loss": loss, "reward": rewards.mean(), "baseline": baseline.mean()}
