"""Scheduled sampling (Bengio et al. 2015): feed the model's own previous word instead of
the ground truth with a probability that grows during training.

Runs through `decoder.step`, so it works for every decoder (at the cost of the teacher-forced
fast path); with probability 0 training uses the fast path instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ScheduledSampling:
    """Probability schedule as in the self-critical captioning code: starts at `start_epoch`
    (negative: never), grows by `increase_prob` every `increase_every` epochs, capped at
    `max_prob`."""

    start_epoch: int = -1
    increase_every: int = 5
    increase_prob: float = 0.05
    max_prob: float = 0.25

    def probability(self, epoch: int) -> float:
        if self.start_epoch < 0 or epoch < self.start_epoch:
            return 0.0
        steps = (epoch - self.start_epoch) // max(1, self.increase_every)
        return min(self.max_prob, steps * self.increase_prob)


def scheduled_sampling_forward(
    decoder: nn.Module,
    grid: torch.Tensor,
    pooled: torch.Tensor,
    tokens: torch.Tensor,
    probability: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like `decoder(grid, pooled, tokens)`, but each input after the first is, with
    `probability`, a word sampled from the model's previous output distribution.

    tokens: (B, T) inputs starting with <bos> -> logits (B, T, V), weights (B, T, N) or None.
    Like the teacher-forced forward, it leaves beta (B, T) (adaptive attention) or None in
    `decoder.last_beta`: a stale one from another batch is another length.
    """
    state = decoder.init_state(grid, pooled)
    prev = tokens[:, 0]
    all_logits, all_weights, all_beta = [], [], []
    for t in range(tokens.shape[1]):
        if t > 0:
            use_model = torch.rand(tokens.shape[0], device=tokens.device) < probability
            if bool(use_model.any()):
                sampled = torch.multinomial(all_logits[-1].detach().softmax(-1), 1).squeeze(1)
                prev = torch.where(use_model, sampled, tokens[:, t])
            else:
                prev = tokens[:, t]
        logits, state, weights = decoder.step(state, prev)
        all_logits.append(logits)
        all_weights.append(weights)
        all_beta.append(getattr(state, "beta", None))  # (B,) or None
    stacked = torch.stack(all_weights, 1) if all_weights[0] is not None else None
    if hasattr(decoder, "last_beta"):
        decoder.last_beta = torch.stack(all_beta, 1).detach() if all_beta[0] is not None else None
    return torch.stack(all_logits, 1), stacked
