"""The hand-written Show-Attend-Tell kernel: `LSTMDecoder` with `additive` attention, fast.

What it computes is exactly the plain cell (`LSTMDecoder._cell` with `AdditiveAttention`):

    e_i = w . tanh(W_k v_i + W_q h) + b,  alpha = softmax(e),  z = sigmoid(f_beta(h)) * sum_i alpha_i v_i
    i, f, g, o = x_t + W_h h + W_z z;  c' = f c + i g;  h' = o tanh(c')

and tests/models/test_sat_kernel.py holds it to that cell in fp64 (logits, attention, every
gradient). What makes it faster on a CPU (README, Performance, has the measurements):
- the three products of h (hidden_proj, the attention's query_proj, the gate f_beta) run as
  one matrix multiply; their weights are stacked at run time (`SATWeights`), so parameter names
  (and old checkpoints) are those of the plain cell;
- a backward written for the whole recurrence (`ShowAttendTellLoop`): per step only the two
  products that carry the gradient back through time; every weight gradient is one large
  product over all valid rows after the loop instead of T thin ones accumulated;
- weights that many steps multiply by are reordered once per sequence into oneDNN's blocked
  layout (`PrepackedLinear`), up to 2x faster for these thin products;
- tanh(u) = 2 sigmoid(2u) - 1 for the (B, N, A) attention energy, so its tanh is never computed
  (PyTorch's CPU tanh is ~6x slower than its sigmoid) and its backward is one sigmoid_backward;
  hence the cache keeps the keys doubled (`SATCache`);
- weight products in the autocast dtype, weights cast once per sequence; attention (scores,
  softmax, context) and the LSTM cell in at least fp32 (16-bit batched matrix-vector products
  and elementwise ops are slower than fp32 ones on CPU, and less accurate).

Nothing here knows nn.Modules: `LSTMDecoder` stacks its parameters into `SATWeights` and calls
`sat_step` (search) or `ShowAttendTellLoop` (teacher forcing).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from imcap.models.attention import AttentionCache

ENERGY_CHUNK_BYTES = 1 << 20  # without autograd, the attention energy is made this much at a time


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 if it is a 16-bit float, else unchanged (fp32, fp64)."""
    return t.float() if t.element_size() < 4 else t


class SATCache(NamedTuple):
    """The attention cache in the form `sat_step` reads, made once per sequence."""

    values: torch.Tensor  # (B, N, C) the grid, at least fp32
    doubled_keys: torch.Tensor  # (B, N, A) 2 * key_proj(grid), at least fp32: tanh(u) via sigmoid(2u)


def sat_cache(cache: AttentionCache) -> SATCache:
    """AdditiveAttention's cache -> the kernel's."""
    return SATCache(at_least_fp32(cache.values), 2 * at_least_fp32(cache.keys))


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off on `device_type` (the kernel picks its dtypes itself); nothing to turn off
    on a device without autocast (e.g. `meta`, where the tests check that no step reads the
    device back)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@functools.cache
def _onednn_can_prepack(dtype: torch.dtype) -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return dtype == torch.float32 and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


class PrepackedLinear:
    """x @ weight.T (+ bias) for a weight that many steps multiply by. On CPU the weight is
    reordered once into oneDNN's blocked layout (as torch.compile's freezing does), which runs
    these thin products (a batch of rows) up to 2x faster than `mm`; elsewhere, or under
    autograd (the packed op has no derivative), plain `F.linear`. `rows` is a hint for the
    layout: the batch the products will see."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: int = 1):
        self.weight, self.bias, self.packed = weight, bias, None
        if weight.device.type == "cpu" and not torch.is_grad_enabled() and _onednn_can_prepack(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


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
                          at_least_fp32(self.score_weight.to(dtype)), at_least_fp32(self.score_bias.to(dtype)))

    def prepacked(self, rows: int) -> tuple[PrepackedLinear, PrepackedLinear]:
        """h -> [hidden_proj; query_proj; gate](h), gated context -> context_proj(gated context)."""
        return PrepackedLinear(self.h_weight, self.h_bias, rows), PrepackedLinear(self.context_weight, None, rows)


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


def sat_step(w: SATWeights, linears: tuple[PrepackedLinear, PrepackedLinear], x: torch.Tensor, h: torch.Tensor,
             c: torch.Tensor, doubled_keys: torch.Tensor, values: torch.Tensor, keep: bool = True,
             active: torch.Tensor | None = None) -> SATStep:
    """One Show-Attend-Tell step. x: (B, 4H) the embedding part of the gates and h: (B, H) in
    the compute dtype (that of w.h_weight); c: (B, H), doubled_keys: (G, N, A), values: (G, N, C),
    at least fp32; G = B, or G images with B/G hypotheses each (consecutive rows), as beam
    search gets from `LSTMDecoder.expand_state`. `linears`: `w.prepacked(...)`. Out of place but
    for one sigmoid_ (which autograd allows there), so `step` can run it under autograd too.
    keep=False (no autograd): the (B, N, A) energy may be made a few images at a time and is
    not returned.

    active (R,), ascending (beam search: the hypotheses that have not ended): compute these
    rows of h and c only; x holds just these rows. The other rows' h and c come back as they
    came and their attention weights as 0; the rest of the SATStep holds the R rows (but for
    the energy, of all B). Each row gets bit for bit what it gets without `active`: the
    products run row by row, and the attention is made for every row in the same shapes (MKL's
    matrix-vector product rounds its last few rows differently, so a row's place counts)."""
    (B, H), (G, N, A) = h.shape, doubled_keys.shape
    K = B // G  # K > 1: the rows are K hypotheses per image, keys and values one per image
    h_all, c_all = h, c
    if active is not None:
        h, c = h.index_select(0, active), c.index_select(0, active)
    h_linear, context_linear = linears
    fused = h_linear(h)  # (R, 4H + A + C')
    query = fused[:, 4 * H : 4 * H + A]
    if active is not None:  # the skipped rows' queries: any value
        query = query.new_zeros(B, A).index_copy_(0, active, query)
    query = query.reshape(G, K, 1, A)
    # w . tanh(u) + b = 2 w . sigmoid(2u) + b - sum(w)
    score_weight, score_bias = 2 * w.score_weight, w.score_bias - w.score_weight.sum()
    if keep or torch.is_grad_enabled() or B * N * A * doubled_keys.element_size() <= ENERGY_CHUNK_BYTES:
        energy = torch.add(doubled_keys.unsqueeze(1), query, alpha=2).sigmoid_().view(B, N, A)  # (B, N, A)
        scores = energy @ score_weight + score_bias  # (B, N)
    else:  # search: a few images at a time, so that the (B, N, A) energy never leaves the cache
        energy, step = None, max(1, ENERGY_CHUNK_BYTES // (K * N * A * doubled_keys.element_size()))
        scores = torch.cat([(torch.add(k.unsqueeze(1), q, alpha=2).sigmoid_() @ score_weight).view(-1, N)
                            for k, q in zip(doubled_keys.split(step), query.split(step))]) + score_bias
    alpha = torch.softmax(scores, dim=-1)
    if active is not None:
        alpha = torch.zeros_like(alpha).index_copy_(0, active, alpha.index_select(0, active))
    context = torch.bmm(alpha.view(G, K, N), values).view(B, -1)  # (B, C)
    if active is not None:
        context = context.index_select(0, active)  # (R, C)
    gate = torch.sigmoid(at_least_fp32(fused[:, 4 * H + A :])) if w.h_bias is not None else None
    gated = (gate * context if gate is not None else context).to(h.dtype)
    gates = at_least_fp32(context_linear(gated) + (x + fused[:, : 4 * H]))  # (R, 4H)
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    tanh_c = torch.tanh(c_new)
    h_new = (o * tanh_c).to(h.dtype)
    if active is not None:
        h_new, c_new = h_all.index_copy(0, active, h_new), c_all.index_copy(0, active, c_new)
    return SATStep(h_new, c_new, alpha, h, energy, context, gate, gated, (i, f, g, o), c, tanh_c)


class ShowAttendTellLoop(torch.autograd.Function):
    """The teacher-forced recurrence as one autograd node: forward runs `sat_step` T times;
    backward walks the steps in reverse with two weight products per step (d_gates @ W_c,
    d_fused @ W_h) and then computes every weight gradient in one product over all valid
    rows. Rows are sorted longest first and step t runs on the first batch_sizes[t] only
    (`imcap.models.packing`): no compute on padding; outputs there are zeros."""

    @staticmethod
    def forward(ctx, x, h0, c0, doubled_keys, values, h_weight, h_bias, context_weight, score_weight, score_bias,
                dtype: torch.dtype, grad: bool, batch_sizes: tuple[int, ...], step: Callable = sat_step):
        # x: (B, T, 4H); h0, c0: (B, H); doubled_keys: (B, N, A); values: (B, N, C) -> (B, T, H), (B, T, N)
        # grad: whether autograd is on outside (inside forward it never is; needs_input_grad
        # says which inputs require grad, even under no_grad)
        keep = grad and any(ctx.needs_input_grad)
        (B, T, _), N = x.shape, doubled_keys.shape[1]
        with without_autocast(x.device.type):
            w = SATWeights(h_weight, h_bias, context_weight, score_weight, score_bias).to(dtype)
            doubled_keys, values = at_least_fp32(doubled_keys), at_least_fp32(values)
            linears = w.prepacked(B)
            h, c, xs = h0.to(dtype), at_least_fp32(c0.to(dtype)), x.to(dtype)
            hs, alphas = h.new_zeros(B, T, h.shape[1]), values.new_zeros(B, T, N)
            steps = []
            for t, b in enumerate(batch_sizes):
                if b == 0:
                    break
                h, c = h[:b], c[:b]  # the rows still running (views)
                s = step(w, linears, xs[:b, t], h, c, doubled_keys[:b], values[:b], keep)
                h, c = s.h, s.c
                hs[:b, t] = h
                alphas[:b, t] = s.alpha
                if keep:
                    steps.append(s)
        ctx.w, ctx.values, ctx.steps = w, values, steps
        # an output kept as a ctx attribute would close a reference cycle (output -> node ->
        # ctx -> output) that only the cyclic GC frees: SCST's few, large steps piled up GBs
        ctx.save_for_backward(alphas)
        ctx.dtypes = (x.dtype, h0.dtype, c0.dtype, doubled_keys.dtype, values.dtype, h_weight.dtype)
        ctx.shape = (B, T)
        return hs, alphas

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_hs, d_alphas):
        w, values, steps, need = ctx.w, ctx.values, ctx.steps, ctx.needs_input_grad
        x_dtype, h_dtype, c_dtype, keys_dtype, values_dtype, w_dtype = ctx.dtypes
        tanh_backward, sigmoid_backward = torch.ops.aten.tanh_backward, torch.ops.aten.sigmoid_backward
        with without_autocast(values.device.type):
            (B, T_in), T, H, (N, A) = ctx.shape, len(steps), steps[0].c.shape[1], steps[0].energy.shape[1:]
            wide, dtype = steps[0].c.dtype, w.h_weight.dtype
            sizes = [s.c.shape[0] for s in steps]  # rows per step, non-increasing
            starts = [0, *itertools.accumulate(sizes)]  # step t's rows in the packed (sum b_t, .) tensors
            # the transposed products that carry d_fused back to h and d_gates back to the gated context
            back_to_h = PrepackedLinear(w.h_weight.t(), None, B)
            back_to_context = PrepackedLinear(w.context_weight.t(), None, B)
            d_fused = w.h_weight.new_empty(starts[-1], w.h_weight.shape[0])  # (sum b_t, 4H + A + C')
            d_doubled_keys = values.new_zeros(B, N, A, dtype=wide)
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
                d_context = at_least_fp32(back_to_context(d_gates))  # (b, C): d gated
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
                d_doubled_keys[:b] += d_z
                d_fused[rows, 4 * H : 4 * H + A] = 2 * d_z.sum(dim=1)
                dh = at_least_fp32(back_to_h(d_fused[rows]))  # (b, H)
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
                d_values = torch.bmm(ctx.saved_tensors[0].transpose(1, 2), d_contexts).to(values_dtype)
            d_h_weight = d_h_bias = d_context_weight = None
            if need[5]:
                d_h_weight = (d_fused.t() @ torch.cat([s.h_prev for s in steps])).to(w_dtype)
            if need[6] and w.h_bias is not None:
                d_h_bias = d_fused.sum(0).to(w_dtype)
            if need[7]:
                d_context_weight = (d_fused[:, : 4 * H].t() @ torch.cat([s.gated for s in steps])).to(w_dtype)
        ctx.steps = ctx.w = ctx.values = None  # freed now, not when the cyclic GC next runs
        return (d_x, dh.to(h_dtype), dc.to(c_dtype), d_doubled_keys.to(keys_dtype), d_values, d_h_weight, d_h_bias,
                d_context_weight, d_score_w.to(w_dtype) if need[8] else None,
                d_score_b.to(w_dtype) if need[9] else None, None, None, None, None)
