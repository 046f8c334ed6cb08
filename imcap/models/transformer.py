"""A transformer caption decoder: causal self-attention over the words so far, cross-attention
over the grid, an MLP; pre-LayerNorm blocks as in GPT-2 / nanoGPT.

The cross-attention of every layer is the `model/attention` option, built as
`attention(key_dim=hidden_dim, query_dim=hidden_dim)` over the grid projected to hidden_dim:
`multihead` gives the decoder of Vaswani et al. 2017; any other attention works too
(single-head) except `none` (the image would never enter) and one that needs a visual sentinel
(`adaptive`: the sentinel comes from an LSTM's memory cell); `attention_support` says so. The weights returned are the last layer's.

Incremental decoding keeps each layer's self-attention keys and values in the state, so step t
attends over t cached positions (O(t) work) instead of re-running the prefix; the cross-attention
keys and values are computed once per sequence in `init_state`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from imcap.errors import ImcapError
from imcap.models.attention import AttentionCache
from imcap.models.decoder import AttentionSupport, compile_options, require_attention
from imcap.models.packing import pack
from imcap.registry import register

POSITIONS = ("sinusoidal", "learned")


class TransformerState(NamedTuple):
    keys: tuple[torch.Tensor, ...]  # per layer (B, heads, t, d): self-attention cache
    values: tuple[torch.Tensor, ...]  # per layer (B, heads, t, d)
    memory: tuple[AttentionCache, ...]  # per layer cross-attention cache, once per sequence


def sinusoidal_positions(start: int, length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Vaswani et al.'s fixed encodings for positions start..start+length-1 -> (length, dim)."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over the words so far, with an optional key/value cache."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # x: (B, T, D); past: keys, values (B, heads, t, d) of the earlier positions
        B, T, D = x.shape
        q, k, v = (z.view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for z in self.qkv(x).split(D, dim=2))  # (B, heads, T, d)
        if past is not None:  # incremental: the new position sees every cached one
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=past is None)  # (B, heads, T, d)
        return self.proj(y.transpose(1, 2).reshape(B, T, D)), (k, v)


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, attention: Callable[..., nn.Module]):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = CausalSelfAttention(dim, heads, dropout)
        self.cross = attention(key_dim=dim, query_dim=dim)
        self.cross_proj = nn.Linear(self.cross.context_dim, dim)  # back into the residual stream
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, memory: AttentionCache, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        # x: (B, T, D) -> x (B, T, D), this layer's keys/values, cross-attention weights (B, T, N)
        y, kv = self.self_attn(self.ln1(x), past)
        x = x + self.drop(y)
        context, weights = self.cross(self.ln2(x), memory)  # (B, T, C'), (B, T, N)
        x = x + self.drop(self.cross_proj(context))
        x = x + self.drop(self.mlp(self.ln3(x)))
        return x, kv, weights


@register("decoder", "transformer")
class TransformerDecoder(nn.Module):
    """N pre-LN transformer layers over the word embeddings, cross-attending to the grid.

    hidden_dim: d_model; heads: self-attention heads (the cross-attention's own `heads` is set
    in model/attention=multihead); ffn_dim: null = 4 * hidden_dim; positions: sinusoidal
    (any length) or learned (up to max_length positions).
    """

    # no `none`: the image would never enter; no sentinel: it comes from an LSTM's memory cell
    attention_support = AttentionSupport(none=False, sentinel=False)
    fixed_shapes = False  # the output layer on every position, padding zeroed; set by compile_steps

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embedding: nn.Module,
        attention: Callable[..., nn.Module] | None,
        hidden_dim: int = 512,
        layers: int = 3,
        heads: int = 8,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        positions: str = "sinusoidal",
        max_length: int = 64,
    ):
        super().__init__()
        require_attention(type(self), attention)
        if positions not in POSITIONS:
            raise ImcapError(f"model.decoder.positions={positions!r}; choose one of {list(POSITIONS)}")
        if layers < 1:
            raise ImcapError(f"model.decoder.layers={layers}; a transformer decoder needs at least one layer")
        if heads < 1 or hidden_dim % heads:
            raise ImcapError(f"model.decoder.heads={heads} must divide model.decoder.hidden_dim={hidden_dim}")
        self.vocab_size, self.hidden_dim, self.heads = vocab_size, hidden_dim, heads
        self.positions, self.max_length = positions, max_length
        self.embedding = embedding
        self.embed_proj = nn.Linear(embedding.dim, hidden_dim, bias=False) if embedding.dim != hidden_dim else None
        self.position_table = nn.Embedding(max_length, hidden_dim) if positions == "learned" else None
        self.memory_proj = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.layers = nn.ModuleList(
            TransformerLayer(hidden_dim, heads, ffn_dim or 4 * hidden_dim, dropout, attention) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.ln_f = nn.LayerNorm(hidden_dim)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        # tokens (B, T) at positions start..start+T-1 -> (B, T, D)
        x = self.embedding(tokens)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        T = tokens.shape[1]
        if self.position_table is None:
            return self.drop(x + sinusoidal_positions(start, T, self.hidden_dim, x.device).to(x.dtype))
        if start + T > self.max_length:
            raise ImcapError(f"caption position {start + T - 1} is past model.decoder.max_length="
                             f"{self.max_length}; raise it or use model.decoder.positions=sinusoidal")
        return self.drop(x + self.position_table(torch.arange(start, start + T, device=x.device)))

    def compile_steps(self, **options) -> None:
        """torch.compile the teacher-forced layers (all positions at once, any length: dynamic
        shapes; a CUDA-graph mode: one graph per caption width, `compile_options`); search's
        `step` stays eager."""
        self._layers = torch.compile(self._layers, **compile_options(self, options))

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state.pop("_layers", None)  # compiled; compile_steps rebuilds it
        return state

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor) -> TransformerState:
        # grid: (B, N, C); pooled is not used (the layers attend to every cell)
        memory = self.memory_proj(grid)  # (B, N, D)
        empty = grid.new_zeros(grid.shape[0], self.heads, 0, self.hidden_dim // self.heads)
        n = len(self.layers)
        return TransformerState((empty,) * n, (empty,) * n,
                                tuple(layer.cross.precompute(memory) for layer in self.layers))

    def step(
        self, state: TransformerState, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, TransformerState, torch.Tensor]:
        """One decoding step: prev_tokens (B,) -> logits (B, V), new state, weights (B, N)."""
        x = self._embed(prev_tokens.unsqueeze(1), start=state.keys[0].shape[2])  # (B, 1, D)
        keys, values = [], []
        for layer, memory, k, v in zip(self.layers, state.memory, state.keys, state.values):
            x, (k, v), weights = layer(x, memory, (k, v))
            keys.append(k)
            values.append(v)
        logits = self.output(self.ln_f(x)).squeeze(1)  # (B, V)
        return logits, TransformerState(tuple(keys), tuple(values), state.memory), weights.squeeze(1)

    def forward(
        self, grid: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: tokens (B, T) inputs -> logits (B, T, V), weights (B, T, N).
        lengths (B,): how many leading positions of each row carry a target; the layers run
        on all T at once (causal: padding never reaches a valid position), the output layer
        only on valid positions; logits and weights are zeros elsewhere (None: every position)."""
        packing = pack(lengths, *tokens.shape, tokens.device, sort=False, fixed=self.fixed_shapes)
        x, weights = self._layers(grid, tokens)  # (B, T, D), (B, T, N)
        logits = packing.on_valid(x, lambda h: self.output(self.ln_f(h)))  # (B, T, V)
        return logits, weights if packing.full else weights * packing.mask.unsqueeze(-1)  # last layer's (B, T, N)

    def _layers(self, grid: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # grid (B, N, C), tokens (B, T) -> the last layer's output (B, T, D) and weights (B, T, N)
        state = self.init_state(grid, None)
        x = self._embed(tokens, start=0)  # (B, T, D)
        for layer, memory in zip(self.layers, state.memory):
            x, _, weights = layer(x, memory, None)  # causal self-attention over all T at once
        return x, weights
