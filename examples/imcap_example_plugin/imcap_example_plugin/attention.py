"""Cosine attention: e_i = exp(t) * cos(W_q q, W_k k_i), with a learned temperature t.

Bounded scores, so no cell can dominate only by the norm of its features. One class with the
two-method contract of imcap's attention variants (`precompute` once per sequence, `scores` per
step); imcap's base class turns the scores into weights and a context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imcap.models.attention import Attention, AttentionCache
from imcap.registry import register


@register("attention", "cosine")
class CosineAttention(Attention):
    def __init__(self, key_dim: int, query_dim: int, attention_dim: int | None = None, temperature: float = 10.0):
        super().__init__(key_dim, query_dim)
        attention_dim = attention_dim or query_dim  # None: the decoder's width (its YAML names that)
        self.key_proj = nn.Linear(key_dim, attention_dim, bias=False)
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def precompute(self, keys: torch.Tensor) -> AttentionCache:
        return AttentionCache(values=keys, keys=F.normalize(self.key_proj(keys), dim=-1))  # (B, N, A)

    def scores(self, query: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        q = F.normalize(self.query_proj(query), dim=-1)  # (B, T, A)
        return self.log_temperature.exp() * torch.bmm(q, cache.keys.transpose(1, 2))  # (B, T, N)
