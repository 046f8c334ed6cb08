"""Recurrent caption decoders.

Every decoder exposes the same two paths:
- `init_state(grid, pooled)` + `step(state, prev_tokens)` for search, one token at a time;
- `forward(grid, pooled, tokens)`, the fast teacher-forced path for training.
Both run the same cell, so incremental decoding reproduces the teacher-forced logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from imcap.models.attention import AttentionCache


class LSTMState(NamedTuple):
    h: torch.Tensor  # (B, H)
    c: torch.Tensor  # (B, H)
    cache: AttentionCache | None  # projected keys and values, computed once per sequence


class LSTMDecoder(nn.Module):
    """Show, Attend and Tell decoder (Xu et al. 2015); with `attention=None`, Show and Tell
    (Vinyals et al. 2015), where the image enters only through the initial state.

    h0, c0 come from the mean grid feature; each step the attention context, scaled by a gate
    sigmoid(f_beta(h)), joins the word embedding as LSTM input. Fast paths: the attention keys
    are projected once per sequence, the embedding half of the LSTM input projection runs for
    all steps in one matrix multiply, and so does the output layer.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embedding: nn.Module,
        attention: Callable[..., nn.Module] | None = None,
        hidden_dim: int = 512,
        dropout: float = 0.5,
        gate: bool = True,
    ):
        super().__init__()
        self.vocab_size, self.hidden_dim = vocab_size, hidden_dim
        self.embedding = embedding
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.input_proj = nn.Linear(embedding.dim, 4 * hidden_dim)
        self.hidden_proj = nn.Linear(hidden_dim, 4 * hidden_dim, bias=False)
        self.attention = attention(key_dim=feature_dim, query_dim=hidden_dim) if attention else None
        if self.attention is not None:
            self.context_proj = nn.Linear(feature_dim, 4 * hidden_dim, bias=False)
            self.gate = nn.Linear(hidden_dim, feature_dim) if gate else None
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor) -> LSTMState:
        # grid: (B, N, C), pooled: (B, C)
        cache = self.attention.precompute(grid) if self.attention is not None else None
        return LSTMState(torch.tanh(self.init_h(pooled)), torch.tanh(self.init_c(pooled)), cache)

    def _cell(self, x: torch.Tensor, state: LSTMState) -> tuple[LSTMState, torch.Tensor | None]:
        # x: (B, 4H), the embedding part of the input projection for this step
        h, c, cache = state
        gates = x + self.hidden_proj(h)
        weights = None
        if self.attention is not None:
            context, weights = self.attention(h, cache)  # (B, C), (B, N)
            if self.gate is not None:
                context = torch.sigmoid(self.gate(h)) * context
            gates = gates + self.context_proj(context)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return LSTMState(h, c, cache), weights

    def step(
        self, state: LSTMState, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, LSTMState, torch.Tensor | None]:
        """One decoding step: prev_tokens (B,) -> logits (B, V), new state, weights (B, N)."""
        state, weights = self._cell(self.input_proj(self.embedding(prev_tokens)), state)
        return self.output(self.dropout(state.h)), state, weights

    def forward(
        self, grid: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: tokens (B, T) inputs -> logits (B, T, V), weights (B, T, N) or None."""
        x = self.input_proj(self.embedding(tokens))  # (B, T, 4H), one matmul for all steps
        state = self.init_state(grid, pooled)
        hs, ws = [], []
        for t in range(tokens.shape[1]):
            state, weights = self._cell(x[:, t], state)
            hs.append(state.h)
            ws.append(weights)
        logits = self.output(self.dropout(torch.stack(hs, dim=1)))  # (B, T, V), one matmul
        return logits, (torch.stack(ws, dim=1) if self.attention is not None else None)
