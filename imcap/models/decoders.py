"""Recurrent caption decoders.

Every decoder exposes the same two paths:
- `init_state(grid, pooled)` + `step(state, prev_tokens)` for search, one token at a time;
- `forward(grid, pooled, tokens)`, the fast teacher-forced path for training.
Both run the same cell, so incremental decoding reproduces the teacher-forced logits.

States are NamedTuples whose leaves are tensors with the batch as dim 0 (or None), so search
can expand and reorder any decoder's state with `index_select(0, ...)` without knowing it.
Each decoder lists the `model/attention` options it accepts in `ATTENTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from imcap.errors import ImcapError
from imcap.models.attention import AttentionCache, attention_kind

ALL_ATTENTIONS = ("none", "additive", "dot", "general", "scaled_dot", "multihead", "adaptive")


def require_attention(decoder: str, accepted: Sequence[str], attention: object) -> None:
    """Refuse an attention option the decoder cannot use (build_captioner checks first and
    lists every valid pair; this guards direct construction)."""
    kind = attention_kind(attention)
    if kind is not None and kind not in accepted:
        raise ImcapError(f"model/decoder={decoder} does not work with model/attention={kind}; "
                         f"choose one of {list(accepted)}")


def lstm_update(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM update from pre-activation gates (B, 4H), ordered i, f, g, o -> h, c."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def visual_sentinel(gate: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Lu et al. 2017: s_t = sigmoid(W_x x_t + W_h h_{t-1}) * tanh(m_t). gate, c: (B, H)."""
    return torch.sigmoid(gate) * torch.tanh(c)


class LSTMState(NamedTuple):
    h: torch.Tensor  # (B, H)
    c: torch.Tensor  # (B, H)
    cache: AttentionCache | None  # projected keys and values, computed once per sequence
    image: torch.Tensor | None = None  # (B, 5H) adaptive: the v_g part of the LSTM input, once per sequence
    beta: torch.Tensor | None = None  # (B,) adaptive: the sentinel's share at the last step


class LSTMDecoder(nn.Module):
    """Show, Attend and Tell decoder (Xu et al. 2015); with `attention=None`, Show and Tell
    (Vinyals et al. 2015), where the image enters only through the initial state.

    h0, c0 come from the mean grid feature; each step the attention context, scaled by a gate
    sigmoid(f_beta(h)), joins the word embedding as LSTM input. Fast paths: the attention keys
    are projected once per sequence, the embedding half of the LSTM input projection runs for
    all steps in one matrix multiply, and so does the output layer.

    With `adaptive` attention the layout is Lu et al. 2017's instead: the LSTM input is the word
    and the global image feature v_g, attention comes after the LSTM step (query h_t, plus the
    visual sentinel from a fifth gate), and the output layer reads context + h_t. `gate` is
    unused there (beta plays its part). The teacher-forced path leaves beta, the sentinel's
    share per step (B, T), in `last_beta` (detached) for logging.
    """

    ATTENTIONS = ALL_ATTENTIONS

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
        require_attention("lstm", self.ATTENTIONS, attention)
        self.vocab_size, self.hidden_dim = vocab_size, hidden_dim
        self.embedding = embedding
        self.attention = attention(key_dim=feature_dim, query_dim=hidden_dim) if attention else None
        self.adaptive = bool(getattr(self.attention, "needs_sentinel", False))
        width = (5 if self.adaptive else 4) * hidden_dim  # adaptive: a 5th chunk, the sentinel gate
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.input_proj = nn.Linear(embedding.dim, width)
        self.hidden_proj = nn.Linear(hidden_dim, width, bias=False)
        if self.adaptive:
            self.image_proj = nn.Linear(feature_dim, width, bias=False)  # v_g, once per sequence
        elif self.attention is not None:
            context_dim = self.attention.context_dim
            self.context_proj = nn.Linear(context_dim, 4 * hidden_dim, bias=False)
            self.gate = nn.Linear(hidden_dim, context_dim) if gate else None
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)
        self.last_beta: torch.Tensor | None = None

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor) -> LSTMState:
        # grid: (B, N, C), pooled: (B, C)
        cache = self.attention.precompute(grid) if self.attention is not None else None
        h, c = torch.tanh(self.init_h(pooled)), torch.tanh(self.init_c(pooled))
        if self.adaptive:
            return LSTMState(h, c, cache, self.image_proj(pooled), pooled.new_zeros(pooled.shape[0]))
        return LSTMState(h, c, cache)

    def _cell(self, x: torch.Tensor, state: LSTMState) -> tuple[LSTMState, torch.Tensor | None, torch.Tensor]:
        # x: (B, 4H) or (B, 5H), the embedding part of the input projection for this step;
        # returns the new state, the weights (B, N) and what the output layer reads (B, H)
        h, c, cache, image, _ = state
        gates = x + self.hidden_proj(h)
        if self.adaptive:
            gates = gates + image
            h, c = lstm_update(gates[:, : 4 * self.hidden_dim], c)
            sentinel = visual_sentinel(gates[:, 4 * self.hidden_dim :], c)
            context, weights, beta = self.attention(h, cache, sentinel=sentinel)  # (B, H), (B, N), (B,)
            return LSTMState(h, c, cache, image, beta), weights, context + h
        weights = None
        if self.attention is not None:
            context, weights = self.attention(h, cache)  # (B, C'), (B, N)
            if self.gate is not None:
                context = torch.sigmoid(self.gate(h)) * context
            gates = gates + self.context_proj(context)
        h, c = lstm_update(gates, c)
        return LSTMState(h, c, cache), weights, h

    def step(
        self, state: LSTMState, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, LSTMState, torch.Tensor | None]:
        """One decoding step: prev_tokens (B,) -> logits (B, V), new state, weights (B, N)."""
        state, weights, out = self._cell(self.input_proj(self.embedding(prev_tokens)), state)
        return self.output(self.dropout(out)), state, weights

    def forward(
        self, grid: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: tokens (B, T) inputs -> logits (B, T, V), weights (B, T, N) or None."""
        x = self.input_proj(self.embedding(tokens))  # (B, T, 4H), one matmul for all steps
        state = self.init_state(grid, pooled)
        outs, ws, betas = [], [], []
        for t in range(tokens.shape[1]):
            state, weights, out = self._cell(x[:, t], state)
            outs.append(out)
            ws.append(weights)
            betas.append(state.beta)
        logits = self.output(self.dropout(torch.stack(outs, dim=1)))  # (B, T, V), one matmul
        self.last_beta = torch.stack(betas, dim=1).detach() if self.adaptive else None  # (B, T)
        return logits, (torch.stack(ws, dim=1) if self.attention is not None else None)
