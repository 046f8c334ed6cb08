"""Attention over the encoder grid.

Interface shared by every variant: `precompute(keys)` once per sequence (projects the keys, the
expensive part, so it never runs per step), then `forward(query, cache, mask)` per step,
returning a context vector and weights that form a distribution over the N grid cells.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class AttentionCache(NamedTuple):
    values: torch.Tensor  # (B, N, C) encoder grid
    keys: torch.Tensor  # (B, N, A) projected once per sequence


class AdditiveAttention(nn.Module):
    """Bahdanau attention, the soft attention of Show, Attend and Tell:
    e_i = w^T tanh(W_k k_i + W_q q),  alpha = softmax(e),  context = sum_i alpha_i v_i."""

    def __init__(self, key_dim: int, query_dim: int, attention_dim: int = 512):
        super().__init__()
        self.key_proj = nn.Linear(key_dim, attention_dim)
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)
        self.score = nn.Linear(attention_dim, 1)

    def precompute(self, keys: torch.Tensor) -> AttentionCache:
        return AttentionCache(values=keys, keys=self.key_proj(keys))

    def forward(
        self, query: torch.Tensor, cache: AttentionCache, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # query: (B, H); mask: (B, N) True where a cell may be attended
        energy = torch.tanh(cache.keys + self.query_proj(query).unsqueeze(1))  # (B, N, A)
        scores = self.score(energy).squeeze(-1)  # (B, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, N)
        context = torch.bmm(weights.unsqueeze(1), cache.values).squeeze(1)  # (B, C)
        return context, weights
