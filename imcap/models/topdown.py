"""The top-down attention decoder of Bottom-Up and Top-Down Attention (Anderson et al. 2018).

Two LSTMs per step: the attention LSTM reads [h2_{t-1}; mean feature; word] and its hidden state
h1_t queries the grid; the language LSTM reads [context; h1_t] and its h2_t predicts the word.
Fast paths as in the LSTM decoder: the keys are projected once per sequence, so is the
mean-feature part of the attention LSTM's input, the word part runs for all steps in one
matmul, and so does the output layer.

With `adaptive` attention the attention LSTM also produces the visual sentinel (a fifth gate on
its input and h1_{t-1}, times tanh of its cell), and beta per step lands in `last_beta`.
There is no `none` option: attention is what this decoder is; use model/decoder=lstm
model/attention=none for a model without attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from imcap.models.attention import AttentionCache
from imcap.models.decoder import (
    AttentionSupport,
    compile_options,
    lstm_update,
    require_attention,
    run_cell,
    teacher_forcing,
    visual_sentinel,
)
from imcap.registry import register


class TopDownState(NamedTuple):
    h1: torch.Tensor  # (B, H) attention LSTM
    c1: torch.Tensor  # (B, H)
    h2: torch.Tensor  # (B, H) language LSTM
    c2: torch.Tensor  # (B, H)
    cache: AttentionCache  # projected keys and values, once per sequence
    image: torch.Tensor  # (B, 4H) or (B, 5H): the mean-feature part of the attention LSTM input
    beta: torch.Tensor | None  # (B,) adaptive: the sentinel's share at the last step


@register("decoder", "topdown")
class TopDownDecoder(nn.Module):
    """Anderson et al. 2018's captioning decoder over the grid features (the "top-down" half;
    the grid plays the bottom-up regions). States start at zero, as in the paper."""

    attention_support = AttentionSupport(none=False, sentinel=True)
    fixed_shapes = False  # every row runs every step (`Packing.fixed`); set by compile_steps

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embedding: nn.Module,
        attention: Callable[..., nn.Module] | None,
        hidden_dim: int = 512,
        dropout: float = 0.5,
    ):
        super().__init__()
        require_attention(type(self), attention)
        self.vocab_size, self.hidden_dim = vocab_size, hidden_dim
        self.embedding = embedding
        self.attention = attention(key_dim=feature_dim, query_dim=hidden_dim)
        self.adaptive = bool(getattr(self.attention, "needs_sentinel", False))
        width = (5 if self.adaptive else 4) * hidden_dim  # adaptive: a 5th chunk, the sentinel gate
        # attention LSTM: input [h2_{t-1}; mean feature; word], recurrent h1_{t-1}
        self.word_proj = nn.Linear(embedding.dim, width)
        self.image_proj = nn.Linear(feature_dim, width, bias=False)
        self.att_hidden_proj = nn.Linear(2 * hidden_dim, width, bias=False)  # [h1_{t-1}; h2_{t-1}]
        # language LSTM: input [context; h1_t], recurrent h2_{t-1}, in one projection
        self.lang_proj = nn.Linear(self.attention.context_dim + 2 * hidden_dim, 4 * hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)
        self.last_beta: torch.Tensor | None = None

    def compile_steps(self, **options) -> None:
        """torch.compile `_cell`, one graph for every step and batch size (rows drop out as
        captions end); with a CUDA-graph mode, fixed shapes instead (`compile_options`)."""
        self._cell = torch.compile(self._cell, **compile_options(self, options))

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state.pop("_cell", None)  # a compiled step; compile_steps rebuilds it
        return state

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor) -> TopDownState:
        # grid: (B, N, C), pooled: (B, C)
        zeros = pooled.new_zeros(pooled.shape[0], self.hidden_dim)
        beta = pooled.new_zeros(pooled.shape[0]) if self.adaptive else None
        return TopDownState(zeros, zeros, zeros, zeros, self.attention.precompute(grid),
                            self.image_proj(pooled), beta)

    def _cell(self, x: torch.Tensor, state: TopDownState) -> tuple[TopDownState, torch.Tensor, torch.Tensor]:
        # x: (B, 4H) or (B, 5H), the word part of the attention LSTM's input projection;
        # returns the new state, the weights (B, N) and what the output layer reads (h2, (B, H))
        h1, c1, h2, c2, cache, image, _ = state
        H = self.hidden_dim
        gates = x + image + self.att_hidden_proj(torch.cat([h1, h2], dim=-1))
        h1, c1 = lstm_update(gates[:, : 4 * H], c1)
        beta = None
        if self.adaptive:
            sentinel = visual_sentinel(gates[:, 4 * H :], c1)
            context, weights, beta = self.attention(h1, cache, sentinel=sentinel)  # (B, H), (B, N), (B,)
        else:
            context, weights = self.attention(h1, cache)  # (B, C'), (B, N)
        h2, c2 = lstm_update(self.lang_proj(torch.cat([context, h1, h2], dim=-1)), c2)
        return TopDownState(h1, c1, h2, c2, cache, image, beta), weights, h2

    def step(
        self, state: TopDownState, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, TopDownState, torch.Tensor]:
        """One decoding step: prev_tokens (B,) -> logits (B, V), new state, weights (B, N)."""
        state, weights, out = self._cell(self.word_proj(self.embedding(prev_tokens)), state)
        return self.output(self.dropout(out)), state, weights

    def forward(
        self, grid: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: tokens (B, T) inputs -> logits (B, T, V), weights (B, T, N).
        lengths (B,): how many leading positions of each row carry a target; no compute is
        spent on the rest, where logits and weights are zeros (None: every position)."""
        return teacher_forcing(self, grid, pooled, tokens, lengths, self.word_proj,
                               lambda x, state, packing: run_cell(self._cell, x, state, packing))
