"""Attention over the encoder grid.

Interface shared by every variant: `precompute(keys)` once per sequence (projects the keys, the
expensive part, so it never runs per step), then `forward(query, cache, mask)` per step,
returning a context vector and weights that form a distribution over the N grid cells.

A query is (B, H) for one step of a recurrent decoder, or (B, T, H) for T positions at once (the
transformer's teacher-forced path); context and weights follow with the same leading dims.
`context_dim` says how wide the context is, so a decoder can size what consumes it.

`adaptive` is the one variant that needs the decoder's help: it mixes a visual sentinel, which
only the decoder's LSTM can produce, into the context, and returns a third output beta, the
share of the sentinel ("how much not to look"). It says so with `needs_sentinel`, and each
decoder says whether it can provide one (`imcap.models.decoder.AttentionSupport`).

A variant of one's own is a subclass with `precompute` and `scores`, registered with
`@register("attention", "name")`, plus conf/model/attention/name.yaml: every decoder that can
drive it accepts it (`imcap.models.decoder.valid_pairs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from imcap.errors import ImcapError
from imcap.registry import name_of, register

NO_ATTENTION = "none"  # the model/attention option without a class (conf/model/attention/none.yaml)


class AttentionCache(NamedTuple):
    values: torch.Tensor  # (B, N, C) what the context averages; (B, heads, N, d) for multihead
    keys: torch.Tensor  # (B, N, A) projected once per sequence; (B, heads, N, d) for multihead


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim (N); mask (B, N) is True where a cell may be attended."""
    if mask is not None:
        shape = (mask.shape[0],) + (1,) * (scores.dim() - 2) + (mask.shape[-1],)
        scores = scores.masked_fill(~mask.view(shape), float("-inf"))
    return torch.softmax(scores, dim=-1)


class Attention(nn.Module):
    """Single-head attention: subclasses define `precompute` and `scores`; the context is the
    weighted average of the cached values."""

    needs_sentinel = False  # True: the decoder must pass a visual sentinel (decoders say if they can)

    def __init__(self, key_dim: int, query_dim: int):
        super().__init__()
        self.key_dim, self.query_dim = key_dim, query_dim
        self.context_dim = key_dim  # the context lives in feature space unless a variant says so

    def precompute(self, keys: torch.Tensor) -> AttentionCache:
        raise NotImplementedError

    def scores(self, query: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        """query (B, T, H) -> unnormalised scores (B, T, N)."""
        raise NotImplementedError

    def forward(
        self, query: torch.Tensor, cache: AttentionCache, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # query: (B, H) or (B, T, H); mask: (B, N) True where a cell may be attended
        q = query.unsqueeze(1) if query.dim() == 2 else query  # (B, T, H)
        weights = masked_softmax(self.scores(q, cache), mask)  # (B, T, N)
        context = torch.bmm(weights, cache.values)  # (B, T, C)
        if query.dim() == 2:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights


@register("attention", "additive")
class AdditiveAttention(Attention):
    """Bahdanau attention, the soft attention of Show, Attend and Tell:
    e_i = w^T tanh(W_k k_i + W_q q),  alpha = softmax(e),  context = sum_i alpha_i v_i."""


    def __init__(self, key_dim: int, query_dim: int, attention_dim: int | None = None):
        super().__init__(key_dim, query_dim)
        attention_dim = attention_dim or query_dim  # None: the decoder's width, as the YAML's default
        self.key_proj = nn.Linear(key_dim, attention_dim)
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)
        self.score = nn.Linear(attention_dim, 1)

    def precompute(self, keys: torch.Tensor) -> AttentionCache:
        return AttentionCache(values=keys, keys=self.key_proj(keys))

    def scores(self, query: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        energy = torch.tanh(cache.keys.unsqueeze(1) + self.query_proj(query).unsqueeze(2))  # (B, T, N, A)
        return self.score(energy).squeeze(-1)  # (B, T, N)


@register("attention", "dot")
class DotAttention(Attention):
    """Luong's dot score e_i = q . m_i over a memory m of the decoder's width; no score parameters.

    The memory is the features themselves when their width equals the decoder's (then `dot` has
    no parameters at all); otherwise the features projected to the decoder's width once per
    sequence, m_i = W_m k_i. The context averages the memory (context_dim = query_dim), as
    Luong's context averages source states of the decoder's width. `general` shares this memory
    and adds its W_a. dot has no score space of its own, so an `attention_dim` is refused rather
    than ignored (`general` takes one: a low-rank W_a).
    """

    def __init__(self, key_dim: int, query_dim: int, attention_dim: int | None = None):
        if attention_dim is not None:  # general passes none up: its attention_dim is its own
            raise ImcapError(f"model.attention.attention_dim={attention_dim} means nothing to model/attention=dot "
                             f"(Luong's dot score has no parameters, so no width of its own): leave it unset, "
                             f"or use model/attention=general for a learnt W_a of that rank")
        super().__init__(key_dim, query_dim)
        self.context_dim = query_dim
        # why: the dot product needs keys of the query's width; projecting the memory (keys and
        # values at once) keeps the score itself free of parameters
        self.memory_proj = nn.Linear(key_dim, query_dim, bias=False) if key_dim != query_dim else None

    def memory(self, keys: torch.Tensor) -> torch.Tensor:
        return self.memory_proj(keys) if self.memory_proj is not None else keys  # (B, N, H)

    def precompute(self, keys: torch.Tensor) -> AttentionCache:
        memory = self.memory(keys)
        return AttentionCache(values=memory, keys=memory)

    def scores(self, query: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        return torch.bmm(query, cache.keys.transpose(1, 2))  # (B, T, N)

    def check_weights(self, state: Mapping[str, torch.Tensor], prefix: str, origin: str) -> None:
        """Refuse, in one line, weights of the earlier dot or general (`origin` names their file)."""
        own = set(self.state_dict())
        if (self.memory_proj is not None and prefix + "memory_proj.weight" not in state) or (
                "key_proj.weight" not in own and prefix + "key_proj.weight" in state):
            # why: before the memory, dot and general both scored W_a k_i and averaged the raw
            # features; that model has no place in this one
            name = name_of(type(self))
            raise ImcapError(f"{origin} holds the earlier model/attention={name}, which projected only the keys "
                             f"and averaged the raw features; it cannot load as today's {name} (a memory of the "
                             f"decoder's width): retrain it with model/attention={name}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        self.check_weights(state_dict, prefix, "these weights")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register("attention", "general")
class GeneralAttention(DotAttention):
    """Luong's general score e_i = q^T W_a m_i over dot's memory m (W_a m_i precomputed once per
    sequence). attention_dim: null = W_a keeps the decoder's width; a number = low rank,
    (W_q q) . (W_a m_i) through that many dims."""

    def __init__(self, key_dim: int, query_dim: int, attention_dim: int | None = None):
        super().__init__(key_dim, query_dim)
        space = attention_dim or query_dim
        self.key_proj = nn.Linear(query_dim, space, bias=False)  # W_a, learnt even when the widths agree
        self.query_proj = nn.Linear(query_dim, space, bias=False) if space != query_dim else None

    def precompute(self, keys: torch.Tensor) -> AttentionCache:
        memory = self.memory(keys)
        return AttentionCache(values=memory, keys=self.key_proj(memory))  # keys: (B, N, A)

    def scores(self, query: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        q = self.query_proj(query) if self.query_proj is not None else query  # (B, T, A)
        return torch.bmm(q, cache.keys.transpose(1, 2))  # (B, T, N)


@register("attention", "scaled_dot")
class ScaledDotAttention(Attention):
    """Scaled dot-product attention (Vaswani et al. 2017), one head:
    e_i = (W_q q) . (W_k k_i) / sqrt(attention_dim), a projection left out where its input already
    has attention_dim dims; the context averages the raw features."""

    def __init__(self, key_dim: int, query_dim: int, attention_dim: int | None = None):
        super().__init__(key_dim, query_dim)
        space = attention_dim or query_dim
        self.key_proj = nn.Linear(key_dim, space, bias=False) if key_dim != space else None
        self.query_proj = nn.Linear(query_dim, space, bias=False) if query_dim != space else None
        self.scale = space**-0.5

    def precompute(self, keys: torch.Tensor) -> AttentionCache:
        projected = self.key_proj(keys) if self.key_proj is not None else keys  # (B, N, A)
        return AttentionCache(values=keys, keys=projected)

    def scores(self, query: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        q = self.query_proj(query) if self.query_proj is not None else query  # (B, T, A)
        return torch.bmm(q, cache.keys.transpose(1, 2)) * self.scale  # (B, T, N)


@register("attention", "multihead")
class MultiHeadAttention(Attention):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017) over the grid.

    Keys and values are projected once per sequence and split into `heads` heads; the context
    is the concatenation of the heads (attention_dim wide). There is no output projection W_O:
    whatever consumes the context (an LSTM's input projection, a transformer layer's residual
    projection) is linear already. Reported weights are the average over heads.
    """


    def __init__(self, key_dim: int, query_dim: int, attention_dim: int | None = None, heads: int = 8):
        super().__init__(key_dim, query_dim)
        attention_dim = attention_dim or query_dim  # None: the decoder's width, as the YAML's default
        if heads < 1 or attention_dim % heads:
            raise ImcapError(f"model.attention.heads={heads} must divide model.attention.attention_dim="
                             f"{attention_dim}; choose e.g. heads=8 with attention_dim=512")
        self.heads, self.head_dim = heads, attention_dim // heads
        self.context_dim = attention_dim
        self.query_proj = nn.Linear(query_dim, attention_dim)
        self.key_proj = nn.Linear(key_dim, attention_dim)
        self.value_proj = nn.Linear(key_dim, attention_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, A) -> (B, heads, L, d)
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def precompute(self, keys: torch.Tensor) -> AttentionCache:
        return AttentionCache(values=self._split(self.value_proj(keys)), keys=self._split(self.key_proj(keys)))

    def forward(
        self, query: torch.Tensor, cache: AttentionCache, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = query.unsqueeze(1) if query.dim() == 2 else query  # (B, T, H)
        q = self._split(self.query_proj(q))  # (B, heads, T, d)
        scores = q @ cache.keys.transpose(-2, -1) * self.head_dim**-0.5  # (B, heads, T, N)
        weights = masked_softmax(scores, mask)  # (B, heads, T, N)
        context = (weights @ cache.values).transpose(1, 2).flatten(2)  # (B, T, A)
        weights = weights.mean(dim=1)  # (B, T, N), still a distribution
        if query.dim() == 2:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights


@register("attention", "adaptive")
class AdaptiveAttention(Attention):
    """Adaptive attention with a visual sentinel (Lu et al. 2017, "Knowing when to look").

    The grid is first embedded into the decoder's space, v_i = ReLU(W_a a_i) (so the sentinel
    and the visual context can be mixed); then
        z_i = w^T tanh(W_v v_i + W_g h),  alpha = softmax(z),  c = sum_i alpha_i v_i,
        z_s = w^T tanh(W_s s + W_g h),    beta = softmax([z; z_s])[N+1],
        context = beta s + (1 - beta) c.
    `weights` are alpha (a distribution over the cells); beta comes back as a third output.
    """

    needs_sentinel = True

    def __init__(self, key_dim: int, query_dim: int, attention_dim: int | None = None):
        super().__init__(key_dim, query_dim)
        attention_dim = attention_dim or query_dim  # None: the decoder's width, as the YAML's default
        self.context_dim = query_dim
        self.value_proj = nn.Linear(key_dim, query_dim)  # W_a: features into the decoder's space
        self.key_proj = nn.Linear(query_dim, attention_dim)  # W_v
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)  # W_g
        self.sentinel_proj = nn.Linear(query_dim, attention_dim, bias=False)  # W_s
        self.score = nn.Linear(attention_dim, 1)  # w

    def precompute(self, keys: torch.Tensor) -> AttentionCache:
        values = torch.relu(self.value_proj(keys))  # (B, N, H)
        return AttentionCache(values=values, keys=self.key_proj(values))  # keys: (B, N, A)

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        cache: AttentionCache,
        mask: torch.Tensor | None = None,
        *,
        sentinel: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # query, sentinel: (B, H) or (B, T, H)
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query  # (B, T, H)
        s = sentinel.unsqueeze(1) if single else sentinel  # (B, T, H)
        qg = self.query_proj(q)  # (B, T, A)
        z = self.score(torch.tanh(cache.keys.unsqueeze(1) + qg.unsqueeze(2))).squeeze(-1)  # (B, T, N)
        if mask is not None:
            z = z.masked_fill(~mask.unsqueeze(1), float("-inf"))
        z_s = self.score(torch.tanh(self.sentinel_proj(s) + qg))  # (B, T, 1)
        weights = torch.softmax(z, dim=-1)  # (B, T, N)
        # the last entry of softmax([z; z_s]), without building the N+1 vector
        beta = torch.sigmoid(z_s - torch.logsumexp(z, dim=-1, keepdim=True))  # (B, T, 1)
        context = beta * s + (1 - beta) * torch.bmm(weights, cache.values)  # (B, T, H)
        beta = beta.squeeze(-1)  # (B, T)
        if single:
            return context.squeeze(1), weights.squeeze(1), beta.squeeze(1)
        return context, weights, beta


def attention_name(attention: object) -> str | None:
    """The model/attention option of an attention class, instance or partial (Hydra's): its
    registered name, NO_ATTENTION for None, None for an unregistered class of one's own."""
    if attention is None:
        return NO_ATTENTION
    return name_of(getattr(attention, "func", attention))
