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

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from imcap.errors import ImcapError
from imcap.models.attention import AdditiveAttention, AttentionCache, attention_kind
from imcap.models.packing import first_rows, on_valid, pack, stack_steps
from imcap.registry import register

ALL_ATTENTIONS = ("none", "additive", "dot", "general", "scaled_dot", "multihead", "adaptive")


def require_attention(decoder: str, accepted: Sequence[str], attention: object) -> None:
    """Refuse an attention option the decoder cannot use (build_captioner checks first and
    lists every valid pair; this guards direct construction)."""
    kind = attention_kind(attention)
    if kind is not None and kind not in accepted:
        raise ImcapError(f"model/decoder={decoder} does not work with model/attention={kind}; "
                         f"choose one of {list(accepted)}")


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in: autocast's where it is on, else `default`."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        cpu = device.type == "cpu"
        if torch.is_autocast_cpu_enabled() if cpu else torch.is_autocast_enabled():
            return torch.get_autocast_cpu_dtype() if cpu else torch.get_autocast_gpu_dtype()
    return default


def lstm_update(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM update from pre-activation gates (B, 4H), ordered i, f, g, o -> h, c."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def visual_sentinel(gate: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Lu et al. 2017: s_t = sigmoid(W_x x_t + W_h h_{t-1}) * tanh(m_t). gate, c: (B, H)."""
    return torch.sigmoid(gate) * torch.tanh(c)


# -- the Show-Attend-Tell fast path (lstm + additive) ----------------------------------------
# The plain code is `LSTMDecoder._cell` with AdditiveAttention. The fast path computes the same
# function with:
# - the three products of h (hidden_proj, the attention's query_proj, the gate f_beta) as one
#   matrix multiply; their weights are concatenated at run time, so parameter names (and old
#   checkpoints) are unchanged;
# - a backward written for the whole recurrence (`ShowAttendTellLoop`): per step only the two
#   products that carry the gradient back through time; every weight gradient is one large
#   product over all T*B rows after the loop instead of T thin ones (K=B) accumulated;
# - the per-step weights reordered once per sequence into oneDNN's blocked layout (`Product`);
# - tanh(u) = 2 sigmoid(2u) - 1 for the (B, N, A) attention energy, so the energy's tanh is
#   never computed (PyTorch's CPU tanh is ~6x slower than its sigmoid) and its backward is one
#   sigmoid_backward;
# - weight products in the autocast dtype, weights cast once per sequence; attention (scores,
#   softmax, context) and the LSTM cell in fp32 (16-bit batched matrix-vector products and
#   elementwise ops are slower than fp32 ones on CPU, and less accurate).


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32."""
    return t.float() if t.element_size() < 4 else t


@functools.cache
def _can_pack(dtype: torch.dtype) -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return dtype == torch.float32 and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def _count_packed_flops() -> None:
    """Teach FlopCounterMode (the bench's FLOP count) oneDNN's packed linear, as it knows mm."""
    try:
        from torch.utils.flop_counter import register_flop_formula

        op = torch.ops.mkldnn._linear_pointwise
    except (ImportError, AttributeError, RuntimeError):
        return

    @register_flop_formula(op)
    def flops(x_shape, w_shape, *args, **kwargs) -> int:  # x (..., K), packed w (N, K)
        return 2 * math.prod(x_shape) * w_shape[0]


_count_packed_flops()


class Product:
    """x @ weight.T (+ bias) for a weight that many steps multiply by. On CPU the weight is
    reordered once into oneDNN's blocked layout (as torch.compile's freezing does), which runs
    these thin products (a batch of rows) up to 2x faster than `mm`; elsewhere, or under
    autograd (the packed op has no derivative), plain `F.linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: int = 1):
        self.weight, self.bias, self.packed = weight, bias, None
        if weight.device.type == "cpu" and not torch.is_grad_enabled() and _can_pack(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


ENERGY_CHUNK_BYTES = 1 << 20  # without autograd, the attention energy is made this much at a time


class SATWeights(NamedTuple):
    """The weights of one Show-Attend-Tell step."""

    h_weight: torch.Tensor  # (4H + A + C', H): hidden_proj; attention.query_proj; gate (C' = 0 without)
    h_bias: torch.Tensor | None  # (4H + A + C',): zeros, then the gate's bias (None without a gate)
    context_weight: torch.Tensor  # (4H, C) context_proj
    score_weight: torch.Tensor  # (A,) attention.score, at least fp32
    score_bias: torch.Tensor  # (1,), at least fp32

    def to(self, dtype: torch.dtype) -> SATWeights:
        """Products' weights in `dtype`, the score's in at least fp32."""
        h_bias = self.h_bias.to(dtype) if self.h_bias is not None else None
        return SATWeights(self.h_weight.to(dtype), h_bias, self.context_weight.to(dtype),
                          _wide(self.score_weight.to(dtype)), _wide(self.score_bias.to(dtype)))

    def products(self, rows: int) -> tuple[Product, Product]:
        """h -> [hidden_proj; query_proj; gate](h), gated context -> context_proj(gated context)."""
        return Product(self.h_weight, self.h_bias, rows), Product(self.context_weight, None, rows)


class SATStep(NamedTuple):
    """One step's outputs and what its backward needs."""

    h: torch.Tensor  # (B, H) new hidden state, compute dtype
    c: torch.Tensor  # (B, H) new cell state, at least fp32
    alpha: torch.Tensor  # (B, N) attention weights
    h_prev: torch.Tensor  # (B, H) the input of the fused product
    energy: torch.Tensor | None  # (B, N, A) sigmoid(2 (keys + W_q h)) = (tanh(keys + W_q h) + 1) / 2
    context: torch.Tensor  # (B, C) sum_i alpha_i v_i
    gate: torch.Tensor | None  # (B, C) sigmoid(f_beta(h)), None without a gate
    gated: torch.Tensor  # (B, C) gate * context in the compute dtype, the input of context_proj
    acts: tuple[torch.Tensor, ...]  # (B, H) x 4: sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
    c_prev: torch.Tensor  # (B, H)
    tanh_c: torch.Tensor  # (B, H)


def sat_step(w: SATWeights, products: tuple[Product, Product], x: torch.Tensor, h: torch.Tensor,
             c: torch.Tensor, keys2: torch.Tensor, values: torch.Tensor, keep: bool = True) -> SATStep:
    """One Show-Attend-Tell step. x: (B, 4H) the embedding part of the gates and h: (B, H) in
    the compute dtype (that of w.h_weight); c: (B, H), keys2: (G, N, A) twice the projected
    keys, values: (G, N, C), at least fp32; G = B, or G images with B/G hypotheses each
    (consecutive rows), as beam search gets from `LSTMDecoder.expand_state`. Out of place
    but for one sigmoid_ (which autograd allows there), so `step` can run it under autograd
    too. keep=False (no autograd): the (B, N, A) energy may be made a few images at a time and
    is not returned."""
    (B, H4), (G, N, A) = x.shape, keys2.shape
    H, K = H4 // 4, B // G  # K > 1: the rows are K hypotheses per image, keys and values one per image
    h_product, context_product = products
    fused = h_product(h)  # (B, 4H + A + C')
    query = fused[:, 4 * H : 4 * H + A].reshape(G, K, 1, A)
    # w . tanh(u) + b = 2 w . sigmoid(2u) + b - sum(w)
    score_weight, score_bias = 2 * w.score_weight, w.score_bias - w.score_weight.sum()
    if keep or torch.is_grad_enabled() or B * N * A * keys2.element_size() <= ENERGY_CHUNK_BYTES:
        energy = torch.add(keys2.unsqueeze(1), query, alpha=2).sigmoid_().view(B, N, A)  # (B, N, A)
        scores = energy @ score_weight + score_bias  # (B, N)
    else:  # search: a few images at a time, so that the (B, N, A) energy never leaves the cache
        energy, step = None, max(1, ENERGY_CHUNK_BYTES // (K * N * A * keys2.element_size()))
        scores = torch.cat([(torch.add(k.unsqueeze(1), q, alpha=2).sigmoid_() @ score_weight).view(-1, N)
                            for k, q in zip(keys2.split(step), query.split(step))]) + score_bias
    alpha = torch.softmax(scores, dim=-1)
    context = torch.bmm(alpha.view(G, K, N), values).view(B, -1)  # (B, C)
    gate = torch.sigmoid(_wide(fused[:, 4 * H + A :])) if w.h_bias is not None else None
    gated = (gate * context if gate is not None else context).to(h.dtype)
    gates = _wide(context_product(gated) + (x + fused[:, : 4 * H]))  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    tanh_c = torch.tanh(c_new)
    h_new = (o * tanh_c).to(h.dtype)
    return SATStep(h_new, c_new, alpha, h, energy, context, gate, gated, (i, f, g, o), c, tanh_c)


class ShowAttendTellLoop(torch.autograd.Function):
    """The teacher-forced recurrence as one autograd node: forward runs `sat_step` T times;
    backward walks the steps in reverse with two weight products per step (d_gates @ W_c,
    d_fused @ W_h) and then computes every weight gradient in one product over all valid
    rows. Rows are sorted longest first and step t runs on the first batch_sizes[t] only
    (`imcap.models.packing`): no compute on padding; outputs there are zeros."""

    @staticmethod
    def forward(ctx, x, h0, c0, keys2, values, h_weight, h_bias, context_weight, score_weight, score_bias,
                dtype: torch.dtype, grad: bool, batch_sizes: tuple[int, ...], step: Callable = sat_step):
        # x: (B, T, 4H); h0, c0: (B, H); keys2: (B, N, A); values: (B, N, C) -> (B, T, H), (B, T, N)
        # grad: whether autograd is on outside (inside forward it never is; needs_input_grad
        # says which inputs require grad, even under no_grad)
        keep = grad and any(ctx.needs_input_grad)
        (B, T, _), N = x.shape, keys2.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            w = SATWeights(h_weight, h_bias, context_weight, score_weight, score_bias).to(dtype)
            keys2, values = _wide(keys2), _wide(values)
            products = w.products(B)
            h, c, xs = h0.to(dtype), _wide(c0.to(dtype)), x.to(dtype)
            hs, alphas = h.new_zeros(B, T, h.shape[1]), values.new_zeros(B, T, N)
            steps = []
            for t, b in enumerate(batch_sizes):
                if b == 0:
                    break
                h, c = h[:b], c[:b]  # the rows still running (views)
                s = step(w, products, xs[:b, t], h, c, keys2[:b], values[:b], keep)
                h, c = s.h, s.c
                hs[:b, t] = h
                alphas[:b, t] = s.alpha
                if keep:
                    steps.append(s)
        ctx.w, ctx.values, ctx.steps, ctx.alphas = w, values, steps, alphas
        ctx.dtypes = (x.dtype, h0.dtype, c0.dtype, keys2.dtype, values.dtype, h_weight.dtype)
        ctx.shape = (B, T)
        return hs, alphas

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_hs, d_alphas):
        w, values, steps, need = ctx.w, ctx.values, ctx.steps, ctx.needs_input_grad
        x_dtype, h_dtype, c_dtype, keys_dtype, values_dtype, w_dtype = ctx.dtypes
        tanh_backward, sigmoid_backward = torch.ops.aten.tanh_backward, torch.ops.aten.sigmoid_backward
        with torch.autocast(values.device.type, enabled=False):
            (B, T_in), T, H, (N, A) = ctx.shape, len(steps), steps[0].c.shape[1], steps[0].energy.shape[1:]
            wide, dtype = steps[0].c.dtype, w.h_weight.dtype
            sizes = [s.c.shape[0] for s in steps]  # rows per step, non-increasing
            starts = [0, *itertools.accumulate(sizes)]  # step t's rows in the packed (sum b_t, .) tensors
            by_h, by_context = Product(w.h_weight.t(), None, B), Product(w.context_weight.t(), None, B)
            d_fused = w.h_weight.new_empty(starts[-1], w.h_weight.shape[0])  # (sum b_t, 4H + A + C')
            d_keys2 = values.new_zeros(B, N, A, dtype=wide)
            d_score_w, d_score_b = values.new_zeros(A, dtype=wide), values.new_zeros(1, dtype=wide)
            d_contexts = values.new_zeros(B, T_in, values.shape[2], dtype=wide) if need[4] else None
            dh, dc = values.new_zeros(0, H, dtype=wide), values.new_zeros(0, H, dtype=wide)
            for t in reversed(range(T)):
                s, b, rows = steps[t], sizes[t], slice(starts[t], starts[t + 1])
                if dh.shape[0] < b:  # rows that ended at this step: nothing flowed back into them yet
                    dh, dc = (F.pad(v, (0, 0, 0, b - v.shape[0])) for v in (dh, dc))
                i, f, g, o = s.acts
                if d_hs is not None:
                    dh = dh + d_hs[:b, t]
                dc = dc + tanh_backward(dh * o, s.tanh_c)
                d_gates = torch.cat([sigmoid_backward(dc * g, i), sigmoid_backward(dc * s.c_prev, f),
                                     tanh_backward(dc * i, g), sigmoid_backward(dh * s.tanh_c, o)], dim=-1)
                d_gates = d_gates.to(dtype)
                d_fused[rows, : 4 * H] = d_gates
                dc = dc * f
                d_context = _wide(by_context(d_gates))  # (b, C): d gated
                if s.gate is not None:
                    d_fused[rows, 4 * H + A :] = sigmoid_backward(d_context * s.context, s.gate)
                    d_context = d_context * s.gate
                if d_contexts is not None:
                    d_contexts[:b, t] = d_context
                d_alpha = torch.bmm(d_context.unsqueeze(1), values[:b].transpose(1, 2)).squeeze(1)  # (b, N)
                if d_alphas is not None:
                    d_alpha = d_alpha + d_alphas[:b, t]
                d_scores = torch.ops.aten._softmax_backward_data(d_alpha, s.alpha, -1, s.alpha.dtype)
                d_sum = d_scores.sum()  # zero up to rounding: softmax ignores a shift
                d_score_w += 2 * torch.mv(s.energy.view(b * N, A).t(), d_scores.view(-1)) - d_sum
                d_score_b += d_sum
                d_z = sigmoid_backward(d_scores.unsqueeze(-1) * (2 * w.score_weight), s.energy)  # (b, N, A)
                d_keys2[:b] += d_z
                d_fused[rows, 4 * H : 4 * H + A] = 2 * d_z.sum(dim=1)
                dh = _wide(by_h(d_fused[rows]))  # (b, H)
            if dh.shape[0] < B:  # rows with no valid position at all
                dh, dc = (F.pad(v, (0, 0, 0, B - v.shape[0])) for v in (dh, dc))

            d_x = None
            if need[0]:
                if sizes == [B] * T_in:  # no padding: the packed rows are (T, B) already
                    d_x = d_fused[:, : 4 * H].view(T, B, 4 * H).transpose(0, 1)
                else:
                    d_x = d_fused.new_zeros(B, T_in, 4 * H)
                    for t, b in enumerate(sizes):
                        d_x[:b, t] = d_fused[starts[t] : starts[t + 1], : 4 * H]
                d_x = d_x.to(x_dtype)
            d_values = None
            if need[4]:  # sum_t alpha_t^T d_context_t, one batched product
                d_values = torch.bmm(ctx.alphas.transpose(1, 2), d_contexts).to(values_dtype)
            d_h_weight = d_h_bias = d_context_weight = None
            if need[5]:
                d_h_weight = (d_fused.t() @ torch.cat([s.h_prev for s in steps])).to(w_dtype)
            if need[6] and w.h_bias is not None:
                d_h_bias = d_fused.sum(0).to(w_dtype)
            if need[7]:
                d_context_weight = (d_fused[:, : 4 * H].t() @ torch.cat([s.gated for s in steps])).to(w_dtype)
        return (d_x, dh.to(h_dtype), dc.to(c_dtype), d_keys2.to(keys_dtype), d_values, d_h_weight, d_h_bias,
                d_context_weight, d_score_w.to(w_dtype) if need[8] else None,
                d_score_b.to(w_dtype) if need[9] else None, None, None, None, None)


class LSTMState(NamedTuple):
    h: torch.Tensor  # (B, H)
    c: torch.Tensor  # (B, H)
    cache: AttentionCache | None  # projected keys and values, computed once per sequence
    image: torch.Tensor | None = None  # (B, 5H) adaptive: the v_g part of the LSTM input, once per sequence
    beta: torch.Tensor | None = None  # (B,) adaptive: the sentinel's share at the last step


@register("decoder", "lstm")
class LSTMDecoder(nn.Module):
    """Show, Attend and Tell decoder (Xu et al. 2015); with `attention=None`, Show and Tell
    (Vinyals et al. 2015), where the image enters only through the initial state.

    h0, c0 come from the mean grid feature; each step the attention context, scaled by a gate
    sigmoid(f_beta(h)), joins the word embedding as LSTM input. Fast paths: the attention keys
    are projected once per sequence, the embedding half of the LSTM input projection runs for
    all steps in one matrix multiply, and so does the output layer. With `additive` attention
    (Show, Attend and Tell proper) both `forward` and `step` run `sat_step`: the three products
    of h in one matrix multiply, and in `forward` the recurrence's own backward
    (`ShowAttendTellLoop`); `fast_path = False` selects the plain per-step code (`_cell`),
    which the tests hold the fast path to.

    With `adaptive` attention the layout is Lu et al. 2017's instead: the LSTM input is the word
    and the global image feature v_g, attention comes after the LSTM step (query h_t, plus the
    visual sentinel from a fifth gate), and the output layer reads context + h_t. `gate` is
    unused there (beta plays its part). The teacher-forced path leaves beta, the sentinel's
    share per step (B, T), in `last_beta` (detached) for logging.
    """

    ATTENTIONS = ALL_ATTENTIONS
    fast_path = True  # False: always the plain per-step code (`_cell`)

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
        self._sat_cache: tuple[tuple, tuple] | None = None  # step's weights, while they are unchanged
        self._sat_step: Callable[..., SATStep] = sat_step

    def __getstate__(self) -> dict:
        # the kept step weights are derived (and oneDNN's packed tensors cannot be copied);
        # compiled steps are rebuilt by compile_steps
        state = {**super().__getstate__(), "_sat_cache": None, "_sat_step": sat_step}
        state.pop("_cell", None)
        return state

    def compile_steps(self, **options) -> None:
        """torch.compile the recurrent step (`sat_step` or `_cell`), one graph for every step
        and batch size (rows drop out as captions end): the elementwise work of the attention
        and the LSTM cell fuses into a few loops. The hand-written backward stays eager."""
        options = {"dynamic": True, **options}
        self._sat_step = torch.compile(sat_step, **options)
        self._cell = torch.compile(self._cell, **options)

    @property
    def _sat(self) -> bool:
        """Whether the Show-Attend-Tell fast path applies (additive attention, no adaptive layout)."""
        return (self.fast_path and type(self.attention) is AdditiveAttention
                and self.hidden_proj.bias is None and self.attention.query_proj.bias is None)

    def _sat_weights(self) -> SATWeights:
        """hidden_proj, query_proj and gate weights stacked into one (4H + A + C', H) matrix."""
        att = self.attention
        h_weight, h_bias = [self.hidden_proj.weight, att.query_proj.weight], None
        if self.gate is not None:
            h_bias = torch.cat([self.gate.bias.new_zeros(sum(w.shape[0] for w in h_weight)), self.gate.bias])
            h_weight.append(self.gate.weight)
        return SATWeights(torch.cat(h_weight), h_bias, self.context_proj.weight, att.score.weight.view(-1),
                          att.score.bias)

    def _sat_step_weights(self, dtype: torch.dtype, rows: int) -> tuple[SATWeights, tuple[Product, ...]]:
        """`step`'s weights in `dtype` and its four products (input projection, h, gated
        context, output layer). Without autograd they are kept for the steps of one sequence:
        `init_state` drops them (an optimiser may have changed the parameters in between, and
        fused optimisers do so without bumping their version counters), as does a parameter
        that is replaced or changed in place."""
        key = None
        if not torch.is_grad_enabled():
            key = (dtype, *((p.data_ptr(), p._version) for p in self.parameters()))  # rows: a hint only
            if self._sat_cache is not None and self._sat_cache[0] == key:
                return self._sat_cache[1]
        w = self._sat_weights().to(dtype)
        inputs, output = (Product(m.weight.to(dtype), m.bias.to(dtype), rows) for m in (self.input_proj, self.output))
        weights = (w, (inputs, *w.products(rows), output))
        if key is not None:
            self._sat_cache = (key, weights)
        return weights

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor) -> LSTMState:
        # grid: (B, N, C), pooled: (B, C)
        self._sat_cache = None  # a new sequence: step weights are rebuilt from the parameters
        cache = self.attention.precompute(grid) if self.attention is not None else None
        if cache is not None and self._sat:  # what `sat_step` reads: fp32, keys doubled
            cache = AttentionCache(_wide(cache.values), 2 * _wide(cache.keys))
        h, c = torch.tanh(self.init_h(pooled)), torch.tanh(self.init_c(pooled))
        if self.adaptive:
            return LSTMState(h, c, cache, self.image_proj(pooled), pooled.new_zeros(pooled.shape[0]))
        return LSTMState(h, c, cache)

    def expand_state(self, state: LSTMState, beams: int) -> LSTMState:
        """The state of `beams` hypotheses per image, rows image by image (for beam search).
        With the fast path the attention cache stays one per image, shared by its hypotheses
        (`step` passes it through untouched, so search never reorders it): each step then reads
        the grid once per image instead of once per hypothesis."""
        index = torch.arange(state.h.shape[0], device=state.h.device).repeat_interleave(beams)

        def rows(x: torch.Tensor | None) -> torch.Tensor | None:
            return x.index_select(0, index) if x is not None else None

        cache = state.cache
        if cache is not None and not self._sat:
            cache = AttentionCache(*(rows(x) for x in cache))
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

    def step(
        self, state: LSTMState, prev_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, LSTMState, torch.Tensor | None]:
        """One decoding step: prev_tokens (B,) -> logits (B, V), new state, weights (B, N)."""
        if self._sat:
            dtype = compute_dtype(prev_tokens.device, self.output.weight.dtype)
            w, (inputs, *products, output) = self._sat_step_weights(dtype, prev_tokens.shape[0])
            with torch.autocast(prev_tokens.device.type, enabled=False):
                x = inputs(self.embedding(prev_tokens).to(dtype))
                s = self._sat_step(w, products, x, state.h.to(dtype), _wide(state.c.to(dtype)), state.cache.keys,
                             state.cache.values, keep=False)
                return output(self.dropout(s.h)), LSTMState(s.h, s.c, state.cache), s.alpha
        x = self.input_proj(self.embedding(prev_tokens))
        state, weights, out = self._cell(x, state)
        return self.output(self.dropout(out)), state, weights

    def forward(
        self, grid: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: tokens (B, T) inputs -> logits (B, T, V), weights (B, T, N) or None.
        lengths (B,): how many leading positions of each row carry a target; no compute is
        spent on the rest, where logits and weights are zeros (None: every position)."""
        packing = pack(lengths, *tokens.shape, tokens.device)
        grid, pooled, tokens = packing.sort(grid), packing.sort(pooled), packing.sort(tokens)
        x = on_valid(self.embedding(tokens), packing.valid, self.input_proj)  # (B, T, 4H), one matmul for all steps
        state = self.init_state(grid, pooled)
        readout = lambda h: self.output(self.dropout(h))  # noqa: E731
        if self._sat and tokens.shape[1] > 0:
            dtype = compute_dtype(x.device, self.output.weight.dtype)
            hs, weights = ShowAttendTellLoop.apply(x, state.h, state.c, state.cache.keys, state.cache.values,
                                                   *self._sat_weights(), dtype, torch.is_grad_enabled(),
                                                   packing.batch_sizes, self._sat_step)
            self.last_beta = None
            return packing.unsort(on_valid(hs, packing.valid, readout)), packing.unsort(weights)  # (B, T, V), one matmul
        outs, ws, betas = [], [], []
        for t, b in enumerate(packing.batch_sizes):
            if b == 0:
                break
            state, weights, out = self._cell(x[:b, t], first_rows(state, b))
            outs.append(out)
            ws.append(weights)
            betas.append(state.beta)
        B, T = tokens.shape
        logits = on_valid(stack_steps(outs, B, T), packing.valid, readout)  # (B, T, V), one matmul
        self.last_beta = packing.unsort(stack_steps(betas, B, T)).detach() if self.adaptive else None  # (B, T)
        weights = packing.unsort(stack_steps(ws, B, T)) if self.attention is not None else None
        return packing.unsort(logits), weights
