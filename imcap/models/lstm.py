"""The LSTM decoder: Show, Attend and Tell, Show and Tell, and Lu et al.'s adaptive layout.

Two ways to run it, chosen in one place (`LSTMDecoder.path`):
- `PlainPath`: the per-step cell (`LSTMDecoder._cell`), for every attention option;
- `ShowAttendTellPath`: with `additive` attention (Show, Attend and Tell proper), the
  hand-written kernel of `imcap.models.sat_kernel`, which the tests hold to the plain path in fp64.
Both give the decoder the same four things: the attention cache of a new sequence, its
expansion to beams, one search step, and the teacher-forced recurrence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from imcap.models.attention import AdditiveAttention, AttentionCache
from imcap.models.decoder import (
    AttentionSupport,
    Recurrence,
    compile_options,
    compute_dtype,
    lstm_update,
    require_attention,
    run_cell,
    teacher_forcing,
    visual_sentinel,
)
from imcap.models.packing import Packing
from imcap.models.sat_kernel import (
    PrepackedLinear,
    SATCache,
    SATStep,
    SATWeights,
    ShowAttendTellLoop,
    at_least_fp32,
    sat_cache,
    sat_step,
    without_autocast,
)
from imcap.registry import register


class LSTMState(NamedTuple):
    h: torch.Tensor  # (B, H)
    c: torch.Tensor  # (B, H)
    cache: AttentionCache | SATCache | None  # projected keys and values, computed once per sequence
    image: torch.Tensor | None = None  # (B, 5H) adaptive: the v_g part of the LSTM input, once per sequence
    beta: torch.Tensor | None = None  # (B,) adaptive: the sentinel's share at the last step


@register("decoder", "lstm")
class LSTMDecoder(nn.Module):
    """Show, Attend and Tell decoder (Xu et al. 2015); with `attention=None`, Show and Tell
    (Vinyals et al. 2015), where the image enters only through the initial state.

    h0, c0 come from the mean grid feature; each step the attention context, scaled by a gate
    sigmoid(f_beta(h)), joins the word embedding as LSTM input. Per sequence, not per step: the
    attention keys are projected once, the embedding half of the LSTM input projection runs for
    all steps in one matrix multiply, and so does the output layer. With `additive` attention
    the Show-Attend-Tell kernel runs both `forward` and `step` (`ShowAttendTellPath`);
    `fast_path = False` selects the plain per-step code, which the tests hold it to.

    With `adaptive` attention the layout is Lu et al. 2017's instead: the LSTM input is the word
    and the global image feature v_g, attention comes after the LSTM step (query h_t, plus the
    visual sentinel from a fifth gate), and the output layer reads context + h_t. `gate` is
    unused there (beta plays its part). The teacher-forced path leaves beta, the sentinel's
    share per step (B, T), in `last_beta` (detached) for logging.
    """

    attention_support = AttentionSupport(none=True, sentinel=True)
    fast_path = True  # False: always the plain per-step code (`_cell`)
    fixed_shapes = False  # every row runs every step (`Packing.fixed`); set by compile_steps

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embedding: nn.Module,
        attention: Callable[..., nn.Module] | None = None,
        hidden_dim: int = 256,
        dropout: float = 0.5,
        gate: bool = True,
    ):
        super().__init__()
        require_attention(type(self), attention)
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
        self.plain_path = PlainPath(self)
        self.sat_path = ShowAttendTellPath(self) if type(self.attention) is AdditiveAttention else None

    @property
    def path(self) -> PlainPath | ShowAttendTellPath:
        """The one place the fast path is chosen: the Show-Attend-Tell kernel where it applies
        and `fast_path` is on, else the plain per-step code."""
        return self.sat_path if self.fast_path and self.sat_path is not None else self.plain_path

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state.pop("_cell", None)  # a compiled step; compile_steps rebuilds it
        return state

    def compile_steps(self, **options) -> None:
        """torch.compile the recurrent step (`sat_step` and `_cell`), one graph for every step
        and batch size (rows drop out as captions end): the elementwise work of the attention
        and the LSTM cell fuses into a few loops. The kernel's hand-written backward stays eager.
        A CUDA-graph mode (reduce-overhead) runs every row every step instead (`compile_options`)."""
        options = compile_options(self, options)
        if self.sat_path is not None:
            self.sat_path.step_fn = torch.compile(sat_step, **options)
        self._cell = torch.compile(self._cell, **options)

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor) -> LSTMState:
        # grid: (B, N, C), pooled: (B, C)
        cache = self.path.attention_cache(grid)
        h, c = torch.tanh(self.init_h(pooled)), torch.tanh(self.init_c(pooled))
        if self.adaptive:
            return LSTMState(h, c, cache, self.image_proj(pooled), pooled.new_zeros(pooled.shape[0]))
        return LSTMState(h, c, cache)

    def expand_state(self, state: LSTMState, beams: int) -> LSTMState:
        """The state of `beams` hypotheses per image, rows image by image (for beam search).
        The Show-Attend-Tell kernel keeps the attention cache one per image, shared by its
        hypotheses (`step` passes it through untouched, so search never reorders it): each
        step then reads the grid once per image instead of once per hypothesis."""
        index = torch.arange(state.h.shape[0], device=state.h.device).repeat_interleave(beams)

        def rows(x: torch.Tensor | None) -> torch.Tensor | None:
            return x.index_select(0, index) if x is not None else None

        cache = self.path.expand_cache(state.cache, rows)
        return LSTMState(rows(state.h), rows(state.c), cache, rows(state.image), rows(state.beta))

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

    @property
    def skips_rows(self) -> bool:
        """Whether `step` takes `active`: only the Show-Attend-Tell kernel computes some rows."""
        return self.path is self.sat_path

    def step(
        self, state: LSTMState, prev_tokens: torch.Tensor, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LSTMState, torch.Tensor | None]:
        """One decoding step: prev_tokens (B,) -> logits (B, V), new state, weights (B, N).
        active (R,), ascending, where `skips_rows` (beam search: the hypotheses that have not
        ended): only these rows are computed; the others keep their state and get logits and
        weights 0."""
        if active is None:
            return self.path.step(state, prev_tokens)
        return self.path.step(state, prev_tokens, active)  # the plain path takes no `active`

    def forward(
        self, grid: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: tokens (B, T) inputs -> logits (B, T, V), weights (B, T, N) or None.
        lengths (B,): how many leading positions of each row carry a target; no compute is
        spent on the rest, where logits and weights are zeros (None: every position)."""
        return teacher_forcing(self, grid, pooled, tokens, lengths, self.input_proj, self.path.recurrence)


class PlainPath:
    """LSTMDecoder's per-step code (`_cell`), for every attention option."""

    def __init__(self, decoder: LSTMDecoder):
        self.decoder = decoder

    def attention_cache(self, grid: torch.Tensor) -> AttentionCache | None:
        attention = self.decoder.attention
        return attention.precompute(grid) if attention is not None else None

    def expand_cache(self, cache: AttentionCache | None, rows: Callable) -> AttentionCache | None:
        return AttentionCache(*(rows(x) for x in cache)) if cache is not None else None

    def step(self, state: LSTMState, prev_tokens: torch.Tensor) -> tuple[torch.Tensor, LSTMState, torch.Tensor | None]:
        d = self.decoder
        state, weights, out = d._cell(d.input_proj(d.embedding(prev_tokens)), state)
        return d.output(d.dropout(out)), state, weights

    def recurrence(self, x: torch.Tensor, state: LSTMState, packing: Packing) -> Recurrence:
        return run_cell(self.decoder._cell, x, state, packing)


class ShowAttendTellPath:
    """LSTMDecoder + additive attention through the Show-Attend-Tell kernel: the decoder's
    parameters stacked into `SATWeights`, `sat_step` for search, `ShowAttendTellLoop` for
    teacher forcing, and the cache as the kernel reads it (`SATCache`)."""

    def __init__(self, decoder: LSTMDecoder):
        self.decoder = decoder
        self.step_fn: Callable[..., SATStep] = sat_step  # compile_steps may compile it
        # `step`'s weights and products, kept for the steps of one sequence: (key, weights)
        self.kept: tuple[tuple, tuple[SATWeights, tuple[PrepackedLinear, ...]]] | None = None

    def __getstate__(self) -> dict:
        # the kept weights are derived (and oneDNN's packed tensors cannot be copied); a
        # compiled step is rebuilt by compile_steps
        return {**self.__dict__, "kept": None, "step_fn": sat_step}

    def weights(self) -> SATWeights:
        """hidden_proj, query_proj and gate weights stacked into one (4H + A + C', H) matrix."""
        d = self.decoder
        att = d.attention
        h_weight, h_bias = [d.hidden_proj.weight, att.query_proj.weight], None
        if d.gate is not None:
            h_bias = torch.cat([d.gate.bias.new_zeros(sum(w.shape[0] for w in h_weight)), d.gate.bias])
            h_weight.append(d.gate.weight)
        return SATWeights(torch.cat(h_weight), h_bias, d.context_proj.weight, att.score.weight.view(-1), att.score.bias)

    def step_weights(self, dtype: torch.dtype, rows: int) -> tuple[SATWeights, tuple[PrepackedLinear, ...]]:
        """`step`'s weights in `dtype` and its four products (input projection, h, gated
        context, output layer). Without autograd they are kept for the steps of one sequence:
        `attention_cache` (a new sequence) drops them (an optimiser may have changed the
        parameters in between, and fused optimisers do so without bumping their version
        counters), as does a parameter that is replaced or changed in place."""
        d, key = self.decoder, None
        if not torch.is_grad_enabled():
            key = (dtype, *((p.data_ptr(), p._version) for p in d.parameters()))  # rows: a hint only
            if self.kept is not None and self.kept[0] == key:
                return self.kept[1]
        w = self.weights().to(dtype)
        inputs, output = (PrepackedLinear(m.weight.to(dtype), m.bias.to(dtype), rows) for m in (d.input_proj, d.output))
        weights = (w, (inputs, *w.prepacked(rows), output))
        if key is not None:
            self.kept = (key, weights)
        return weights

    def attention_cache(self, grid: torch.Tensor) -> SATCache:
        self.kept = None  # a new sequence: step weights are rebuilt from the parameters
        return sat_cache(self.decoder.attention.precompute(grid))

    def expand_cache(self, cache: SATCache, rows: Callable) -> SATCache:
        return cache  # one per image, shared by its hypotheses (sat_step reads it per image)

    def step(self, state: LSTMState, prev_tokens: torch.Tensor,
             active: torch.Tensor | None = None) -> tuple[torch.Tensor, LSTMState, torch.Tensor]:
        d = self.decoder
        dtype = compute_dtype(prev_tokens.device, d.output.weight.dtype)
        w, (inputs, *linears, output) = self.step_weights(dtype, prev_tokens.shape[0])
        with without_autocast(prev_tokens.device.type):
            tokens = prev_tokens if active is None else prev_tokens.index_select(0, active)
            x = inputs(d.embedding(tokens).to(dtype))
            s = self.step_fn(w, linears, x, state.h.to(dtype), at_least_fp32(state.c.to(dtype)),
                             state.cache.doubled_keys, state.cache.values, keep=False, active=active)
            if active is None:
                return output(d.dropout(s.h)), LSTMState(s.h, s.c, state.cache), s.alpha
            computed = output(d.dropout(s.h.index_select(0, active)))  # (R, V)
            logits = computed.new_zeros(len(prev_tokens), computed.shape[1]).index_copy_(0, active, computed)
            return logits, LSTMState(s.h, s.c, state.cache), s.alpha

    def recurrence(self, x: torch.Tensor, state: LSTMState, packing: Packing) -> Recurrence:
        dtype = compute_dtype(x.device, self.decoder.output.weight.dtype)
        hs, weights = ShowAttendTellLoop.apply(x, state.h, state.c, state.cache.doubled_keys, state.cache.values,
                                               *self.weights(), dtype, torch.is_grad_enabled(),
                                               packing.batch_sizes, self.step_fn)
        return Recurrence(hs, weights, None)
