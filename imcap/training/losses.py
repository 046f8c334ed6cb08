"""Training losses for teacher-forced captioning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imcap.models.sat_kernel import without_autocast

# on CPU, rows of fp32 log-probabilities made at a time (26 rows at V = 10,000): they stay in
# cache from the log-softmax to the gradient written out. Elsewhere (GPU) all rows at once: a
# few kernels per step rather than a few per chunk
CHUNK_BYTES = 1 << 20


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over the rows `rows` of logits (R, V) (None: every row), with label
    smoothing; the gradient is computed in the forward pass, a chunk of rows at a time, and
    kept in the logits' dtype. Why: torch's cross-entropy on bf16 logits makes an fp32 copy of
    them, an fp32 log-softmax that autograd keeps, a zero-filled fp32 gradient and a cast back,
    each a pass over the (B*T, V) tensor; here each chunk's log-softmax is made in fp32 and
    turned into its gradient while it is still in cache. Measured on bf16 logits (640, 10000),
    forward and backward, one thread: about 23 -> 17 ms; fp32 about as before. The loss is at
    least fp32 also without autocast (torch's would be bf16 there)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor | None, targets: torch.Tensor,
                smoothing: float) -> torch.Tensor:
        # logits (R, V); rows (n,) row indices or None; targets (n,) -> the mean loss, >= fp32
        (R, V), n = logits.shape, targets.shape[0]
        wide = torch.promote_types(logits.dtype, torch.float32)
        want_grad = ctx.needs_input_grad[0]
        grad = None
        if want_grad:  # the rows not read get a zero gradient
            grad = logits.new_empty(R, V) if rows is None else logits.new_zeros(R, V)
        total = logits.new_zeros((), dtype=wide)
        chunk = max(1, CHUNK_BYTES // (V * 4) if logits.device.type == "cpu" else n)
        with without_autocast(logits.device.type):
            for start in range(0, n, chunk):
                part = slice(start, start + chunk)
                z = logits[part] if rows is None else logits.index_select(0, rows[part])
                logp = torch.log_softmax(z, dim=-1, dtype=wide)  # (c, V)
                t = targets[part].unsqueeze(1)  # (c, 1)
                picked = logp.gather(1, t)
                total -= (1 - smoothing) * picked.sum()
                if smoothing:
                    total -= smoothing / V * logp.sum()
                if not want_grad:
                    continue
                d = logp.exp_()  # softmax - (1 - s) one-hot - s / V, over the n rows
                if smoothing:
                    d.sub_(smoothing / V)
                d.scatter_add_(1, t, d.new_full(t.shape, smoothing - 1)).div_(n)
                if rows is None:
                    grad[part] = d
                else:
                    grad.index_copy_(0, rows[part], d.to(grad.dtype))
        ctx.grad = grad
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_loss: torch.Tensor):
        grad = ctx.grad * d_loss.to(ctx.grad.dtype)
        return grad, None, None, None


def caption_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, pad_id: int, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean token cross-entropy over non-pad targets (as F.cross_entropy with ignore_index
    and label_smoothing computes it), at least in fp32: torch's own for fp32 logits, the chunked
    one above for bf16 and fp16. logits (B, T, V), targets (B, T).
    Only the valid positions are read (the decoders leave zeros at the others)."""
    if logits.dtype in (torch.float32, torch.float64):  # torch's own: what fp32 training always computed
        valid = targets != pad_id  # (B, T)
        if bool(valid.all()):  # no copy
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=label_smoothing)
        return F.cross_entropy(logits[valid], targets[valid], label_smoothing=label_smoothing)
    flat, targets = logits.flatten(0, 1), targets.flatten()  # (B*T, V), (B*T,)
    valid = targets != pad_id
    rows = None
    if not bool(valid.all()):  # no index when every position is valid
        rows = valid.nonzero().squeeze(1)
        targets = targets.index_select(0, rows)
    return ChunkedCrossEntropy.apply(flat, rows, targets, float(label_smoothing))


def doubly_stochastic_penalty(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Show-Attend-Tell's regulariser: every grid cell should receive, summed over the
    caption, about one unit of attention. weights (B, T, N), valid (B, T) bool."""
    total = (weights * valid.unsqueeze(-1)).sum(dim=1)  # (B, N)
    return ((1.0 - total) ** 2).mean()
