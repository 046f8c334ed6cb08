"""Decoding strategies. Search talks only to `Decoder.init_state` / `Decoder.step`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class SearchResult(NamedTuple):
    tokens: torch.Tensor  # (B, L) generated ids, <eos> included, <pad> after it
    scores: torch.Tensor  # (B,) sum of token log-probabilities
    attention: torch.Tensor | None  # (B, L, N) weights per generated token


@torch.no_grad()
def greedy_search(
    decoder: nn.Module,
    grid: torch.Tensor,
    pooled: torch.Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int = 20,
) -> SearchResult:
    """Most probable token at every step, for the whole batch at once; stops when every
    sequence has emitted <eos> or after `max_length` tokens."""
    batch = grid.shape[0]
    state = decoder.init_state(grid, pooled)
    prev = torch.full((batch,), bos_id, dtype=torch.long, device=grid.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=grid.device)
    scores = torch.zeros(batch, device=grid.device)
    tokens, maps = [], []
    for _ in range(max_length):
        logits, state, weights = decoder.step(state, prev)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        best_logp, best = logp.max(dim=-1)
        best = best.masked_fill(finished, pad_id)
        scores += best_logp.masked_fill(finished, 0.0)
        tokens.append(best)
        if weights is not None:
            maps.append(weights)
        finished |= best == eos_id
        prev = best
        if bool(finished.all()):
            break
    attention = torch.stack(maps, dim=1) if maps else None
    return SearchResult(torch.stack(tokens, dim=1), scores, attention)
