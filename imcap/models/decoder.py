"""The decoder contract, what a decoder asks of an attention, and helpers every decoder shares.

Every decoder exposes the same two paths:
- `init_state(grid, pooled)` + `step(state, prev_tokens)` for search, one token at a time;
- `forward(grid, pooled, tokens, lengths)`, the fast teacher-forced path for training.
Both run the same cell, so incremental decoding reproduces the teacher-forced logits.

States are NamedTuples whose leaves are tensors with the batch as dim 0 (or None), so search
can expand and reorder any decoder's state with `index_select(0, ...)` without knowing it.

Which `model/attention` options a decoder takes is derived, never listed: each decoder class
says what it can offer an attention (`AttentionSupport`), each attention says what it needs
(`needs_sentinel`), and `accepts` / `valid_pairs` combine that with the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from imcap import registry
from imcap.errors import ImcapError
from imcap.models.attention import NO_ATTENTION, attention_name
from imcap.models.packing import Packing, first_rows, map_state, pack, stack_steps


@runtime_checkable
class Decoder(Protocol):
    """What search, training and the captioner call. Optional, found with getattr:
    `expand_state(state, beams)` (beam search: a state with `beams` rows per image, which may
    keep per-image leaves unexpanded), `skips_rows` (True: `step(state, prev_tokens, active=rows)`
    computes only those rows, the others keeping their state, with logits and weights 0; beam
    search skips its finished hypotheses) and `compile_steps(**options)` (torch.compile the hot
    path; `model.compile`)."""

    vocab_size: int

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor) -> Any:
        """grid (B, N, C), pooled (B, C) -> a state: a NamedTuple of batch-first tensors."""

    def step(self, state: Any, prev_tokens: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """prev_tokens (B,) -> logits (B, V), the new state, attention weights (B, N) or None."""

    def forward(self, grid: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: tokens (B, T) -> logits (B, T, V), weights (B, T, N) or None; zeros
        past each row's `lengths` (None: every position is valid)."""


@dataclass(frozen=True)
class AttentionSupport:
    """What a decoder offers the `model/attention` option it is built with."""

    none: bool  # it works without attention (model/attention=none)
    sentinel: bool  # it can produce the visual sentinel an attention with `needs_sentinel` mixes in


def expand_for_beams(decoder: Any, state: Any, beams: int) -> Any:
    """`state` with `beams` rows per image, image by image (beam search): the decoder's own
    `expand_state` where it has one (it may keep per-image leaves unexpanded), else every leaf's
    rows repeated."""
    if hasattr(decoder, "expand_state"):
        return decoder.expand_state(state, beams)
    return map_state(state, partial(torch.repeat_interleave, repeats=beams, dim=0))


def accepts(decoder: type, attention: object) -> bool:
    """Whether `decoder` (a class) can be built with `attention` (class, instance, partial or None)."""
    support: AttentionSupport = decoder.attention_support
    if attention is None:
        return support.none
    cls = getattr(attention, "func", attention)
    return support.sentinel or not getattr(cls, "needs_sentinel", False)


def valid_pairs() -> list[tuple[str, str]]:
    """Every registered (model/decoder, model/attention) pair that builds, decoders and
    attentions in name order, "none" first."""
    return [(d, a) for d in registry.names("decoder") for a in attentions_for(registry.get("decoder", d))]


def attentions_for(decoder: type) -> list[str]:
    """The model/attention options `decoder` (a class) accepts, "none" first, then by name."""
    attentions = {NO_ATTENTION: None, **{n: registry.get("attention", n) for n in registry.names("attention")}}
    return [name for name, cls in attentions.items() if accepts(decoder, cls)]


def describe_valid_pairs() -> str:
    """`lstm: none, adaptive, ...; topdown: ...`: the valid pairs for an error message."""
    return "; ".join(f"{d}: {', '.join(attentions_for(registry.get('decoder', d)))}"
                     for d in registry.names("decoder"))


def require_attention(decoder: type, attention: object) -> None:
    """Refuse an attention the decoder cannot use (build_captioner checks the configs first;
    this guards direct construction)."""
    if not accepts(decoder, attention):
        name = registry.name_of(decoder) or decoder.__name__
        shown = attention_name(attention) or getattr(getattr(attention, "func", attention), "__name__", attention)
        raise ImcapError(f"model/decoder={name} does not work with model/attention={shown}; "
                         f"valid pairs (decoder: attentions) are {describe_valid_pairs()}")


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in: autocast's where it is on, else `default`."""
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if available is not None and not available(device.type):  # e.g. meta: no autocast there
        return default
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        cpu = device.type == "cpu"
        if torch.is_autocast_cpu_enabled() if cpu else torch.is_autocast_enabled():
            return torch.get_autocast_cpu_dtype() if cpu else torch.get_autocast_gpu_dtype()
    return default


# torch.compile modes that record CUDA graphs (on CUDA): a graph replays one set of shapes
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_options(decoder: Any, options: dict) -> dict:
    """`model.compile`'s options for torch.compile, and the decoder's shape policy. A mode that
    records CUDA graphs gets fixed shapes (`decoder.fixed_shapes`: every row runs every step,
    padding is zeroed; `Packing.fixed`) and static shapes by default: with length buckets
    (`data.length_buckets`) an epoch then has a handful of shapes, one graph each. Other modes
    keep skipping padding, with dynamic shapes (one graph for every step and batch size)."""
    graphs = options.get("mode") in CUDA_GRAPH_MODES
    decoder.fixed_shapes = graphs
    return {"dynamic": not graphs, **options}


def lstm_update(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM update from pre-activation gates (B, 4H), ordered i, f, g, o -> h, c."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def visual_sentinel(gate: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Lu et al. 2017: s_t = sigmoid(W_x x_t + W_h h_{t-1}) * tanh(m_t). gate, c: (B, H)."""
    return torch.sigmoid(gate) * torch.tanh(c)


# A recurrent cell: (x_t (b, ...), state of b rows) -> (new state, weights (b, N) or None, what
# the output layer reads (b, H)).
Cell = Callable[[torch.Tensor, Any], tuple[Any, "torch.Tensor | None", torch.Tensor]]


class Recurrence(NamedTuple):
    """What a teacher-forced recurrence returns, rows in packed (sorted) order, zeros past each
    row's end."""

    outputs: torch.Tensor  # (B, T, H) what the output layer reads
    weights: torch.Tensor | None  # (B, T, N), None without attention
    beta: torch.Tensor | None  # (B, T) adaptive attention's sentinel share, else None


def run_cell(cell: Cell, x: torch.Tensor, state: Any, packing: Packing) -> Recurrence:
    """`cell` over the steps of a packed batch: step t runs on the first batch_sizes[t] rows
    (the rows still running; `imcap.models.packing`). x: (B, T, ...) the per-step inputs."""
    outs, ws, betas = [], [], []
    for t, b in enumerate(packing.batch_sizes):
        if b == 0:
            break
        state, weights, out = cell(x[:b, t], first_rows(state, b))
        outs.append(out)
        ws.append(weights)
        betas.append(getattr(state, "beta", None))
    B, T = x.shape[:2]

    def stacked(steps: list) -> torch.Tensor | None:
        return stack_steps(steps, B, T) if steps[0] is not None else None

    return Recurrence(stack_steps(outs, B, T), stacked(ws), stacked(betas))


def teacher_forcing(
    decoder: Any,
    grid: torch.Tensor,
    pooled: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor | None,
    word_proj: Callable[[torch.Tensor], torch.Tensor],
    recurrence: Callable[[torch.Tensor, Any, Packing], Recurrence],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher-forced forward of a recurrent decoder, no compute on padding: rows sorted
    longest first, the word projection and the output layer in one matrix multiply over the
    valid positions, `recurrence` (usually `run_cell` with the decoder's cell) in between.
    Returns logits (B, T, V) and weights (B, T, N) or None in the caller's row order, and
    leaves beta (B, T) (adaptive attention) or None in `decoder.last_beta`, detached."""
    packing = pack(lengths, *tokens.shape, tokens.device, fixed=getattr(decoder, "fixed_shapes", False))
    grid, pooled, tokens = packing.sort(grid), packing.sort(pooled), packing.sort(tokens)
    x = packing.on_valid(decoder.embedding(tokens), word_proj)  # (B, T, 4H), one matmul for all steps
    out = recurrence(x, decoder.init_state(grid, pooled), packing)
    logits = packing.on_valid(out.outputs, lambda h: decoder.output(decoder.dropout(h)))  # (B, T, V)
    weights, beta = packing.zero_padding(out.weights), packing.zero_padding(out.beta)  # fixed shapes ran on padding
    decoder.last_beta = packing.unsort(beta).detach() if beta is not None else None
    return packing.unsort(logits), packing.unsort(weights)
