"""Teacher forcing without compute on padding.

Captions in a batch differ in length (Flickr8k: median 13 tokens, the longest of a batch of 32
often 20+), so a padded batch spends a third or more of the recurrence and of the output layer
(the largest product of a training step) on <pad>. With the rows sorted longest first, step t
runs on the first `batch_sizes[t]` rows only, as torch's PackedSequence and cuDNN do, and the
output layer runs on the valid positions only. `collate` already sorts batches that way;
decoders sort (and unsort) any other input themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class Packing(NamedTuple):
    """Which positions of a (B, T) teacher-forced input carry a target, rows sorted.

    Made once per batch on the host from host lengths (`pack`): the per-step loop then reads
    only Python ints (`batch_sizes`) and tensors that were copied to the device before it, so
    no step waits for the device (on a GPU, a `.item()` or a boolean index inside the loop
    stalls the launch queue every step)."""

    lengths: torch.Tensor  # (B,) valid positions per row, longest first, each in [0, T]
    batch_sizes: tuple[int, ...]  # (T,) rows that run at step t: non-increasing
    order: torch.Tensor | None  # (B,) the permutation that sorted the rows; None: kept as given
    inverse: torch.Tensor | None  # (B,) its inverse (unsort)
    full: bool  # every position is valid (no padding at all)
    index: tuple[torch.Tensor, torch.Tensor] | None  # rows, steps (n,) each: the positions with a target; None: all
    mask: torch.Tensor | None  # (B, T) bool, the same positions as a mask (sorted rows); None: all
    fixed: bool = False  # every row runs every step, padding is zeroed: one shape per width (CUDA graphs)

    @property
    def valid(self) -> torch.Tensor | None:
        """(B, T) bool, sorted rows: position t of row b carries a target; None: all do."""
        return self.mask

    def sort(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Rows of x (B, ...) in sorted order."""
        return x if x is None or self.order is None else x.index_select(0, self.order)

    def unsort(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Rows of x (B, ...) back in the caller's order."""
        return x if x is None or self.inverse is None else x.index_select(0, self.inverse)

    def on_valid(self, hs: torch.Tensor, layer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """layer applied to the valid positions of hs (B, T, H) -> (B, T, V), zeros elsewhere.
        Fixed shapes: on every position, then zeroed (the product's shape is then the same for
        every batch of a bucket, which a CUDA graph needs; a gather of n valid rows is not)."""
        if self.full:
            return layer(hs)
        if self.fixed:
            return self.zero_padding(layer(hs))
        return on_valid(hs, self.index, layer)

    def zero_padding(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """x (B, T, ...) with the positions that carry no target set to zero (fixed shapes
        only: otherwise they were never computed and are zero already)."""
        if x is None or self.full or not self.fixed:
            return x
        mask = self.mask.view(*self.mask.shape, *(1,) * (x.dim() - 2))
        return torch.where(mask, x, x.new_zeros(()))


def pack(lengths: torch.Tensor | None, batch: int, steps: int, device: torch.device, sort: bool = True,
         fixed: bool = False) -> Packing:
    """The packing of a (batch, steps) input; lengths (B,) None means every position is valid.

    Give the lengths on the host (the module passes the collated ones): the schedule is
    computed there and what the device needs is copied over without blocking. Lengths on a
    device are read back once here (one sync per batch, before the loop). sort=False keeps
    the rows in their order (a decoder that runs all positions at once); fixed=True runs every
    row at every step (`Packing.fixed`)."""
    if lengths is None:
        return Packing(torch.full((batch,), steps, device=device), (batch,) * steps, None, None, True, None, None,
                       fixed)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    host = lengths.detach().to("cpu", torch.long).clamp(0, steps)  # (B,)
    order = inverse = None
    if sort and not fixed and bool((host[:-1] < host[1:]).any()):
        order = torch.argsort(host, descending=True, stable=True)
        inverse = torch.argsort(order)
        host = host.index_select(0, order)
    full = bool((host == steps).all())
    if fixed or not sort:
        batch_sizes = (batch,) * steps
    else:
        counts = torch.bincount(host, minlength=steps + 1)  # rows per length
        batch_sizes = tuple((batch - torch.cumsum(counts, 0)[:steps]).tolist())  # rows with length > t
    mask = index = None
    if not full:
        mask = torch.arange(steps) < host.unsqueeze(1)  # (B, T)
        index = mask.nonzero(as_tuple=True)  # rows, steps (n,) each: on the host, no sync

    def to_device(x: torch.Tensor | None) -> torch.Tensor | None:
        return x if x is None else x.to(device, non_blocking=True)

    return Packing(to_device(host), batch_sizes, to_device(order), to_device(inverse), full,
                   tuple(map(to_device, index)) if index is not None else None, to_device(mask), fixed)


def valid_mask(lengths: torch.Tensor | None, steps: int) -> torch.Tensor | None:
    """(B, steps) bool: position t of row b is one of its first lengths[b]; None: all are."""
    if lengths is None or bool((lengths >= steps).all()):
        return None
    return torch.arange(steps, device=lengths.device) < lengths.unsqueeze(1)


def on_valid(hs: torch.Tensor, valid: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
             layer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """layer applied to the valid positions of hs (B, T, H) only -> (B, T, V), zeros elsewhere.
    valid: their rows and steps ((n,), (n,)), or a (B, T) bool mask (on a device that is a
    read back: a mask's positions are counted first), or None (all). Indexed by (rows, steps)
    pairs, not flat positions: a flat index_select and its backward measured 15-26% slower on
    CPU (B=32, T=20, V=10,000, forward + backward)."""
    if valid is None:
        return layer(hs)
    if isinstance(valid, torch.Tensor):
        valid = valid.nonzero(as_tuple=True)
    out = layer(hs[valid])  # (n, V), n valid positions
    return out.new_zeros(*hs.shape[:2], out.shape[-1]).index_put(valid, out)


def map_state(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every tensor leaf of a decoder state (tuples, NamedTuples, None)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, tuple):
        leaves = [map_state(s, fn) for s in state]
        return type(state)(*leaves) if hasattr(state, "_fields") else tuple(leaves)
    raise TypeError(f"decoder state leaves must be tensors, tuples or None; got {type(state).__name__}")


def first_rows(state: Any, rows: int) -> Any:
    """A decoder state (tensor leaves with the batch as dim 0) cut to its first `rows` rows:
    the rows still running at this step. Views, no copies."""
    return map_state(state, lambda v: v[:rows] if v.shape[0] > rows else v)


def stack_steps(steps: list[torch.Tensor], batch: int, total_steps: int) -> torch.Tensor:
    """Per-step outputs (b_t, ...) with b_t non-increasing -> (batch, total_steps, ...), zeros
    where a row had ended (or for steps that never ran)."""
    padded = [s if s.shape[0] == batch else F.pad(s, (0, 0) * (s.dim() - 1) + (0, batch - s.shape[0]))
              for s in steps]
    out = torch.stack(padded, dim=1)
    if out.shape[1] < total_steps:
        out = F.pad(out, (0, 0) * (out.dim() - 2) + (0, total_steps - out.shape[1]))
    return out
