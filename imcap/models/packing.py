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
    """Which positions of a (B, T) teacher-forced input carry a target, rows sorted."""

    lengths: torch.Tensor  # (B,) valid positions per row, longest first, each in [0, T]
    batch_sizes: tuple[int, ...]  # (T,) rows with a valid position t: non-increasing
    order: torch.Tensor | None  # (B,) the permutation that sorted the rows; None: they were sorted
    full: bool  # every position is valid (no padding at all)

    @property
    def valid(self) -> torch.Tensor | None:
        """(B, T) bool, sorted rows: position t of row b carries a target; None: all do."""
        return None if self.full else valid_mask(self.lengths, len(self.batch_sizes))

    def sort(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Rows of x (B, ...) in sorted order."""
        return x if x is None or self.order is None else x.index_select(0, self.order)

    def unsort(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Rows of x (B, ...) back in the caller's order."""
        if x is None or self.order is None:
            return x
        return x.index_select(0, torch.argsort(self.order))


def pack(lengths: torch.Tensor | None, batch: int, steps: int, device: torch.device) -> Packing:
    """The packing of a (batch, steps) input; lengths (B,) None means every position is valid."""
    if lengths is None:
        return Packing(torch.full((batch,), steps, device=device), (batch,) * steps, None, True)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    lengths = lengths.to(device=device).clamp(0, steps)
    order = None
    if bool((lengths[:-1] < lengths[1:]).any()):
        order = torch.argsort(lengths, descending=True, stable=True)
        lengths = lengths.index_select(0, order)
    counts = torch.bincount(lengths, minlength=steps + 1)  # rows per length
    batch_sizes = (batch - torch.cumsum(counts, 0)[:steps]).tolist()  # rows with length > t
    return Packing(lengths, tuple(batch_sizes), order, bool((lengths == steps).all()))


def valid_mask(lengths: torch.Tensor | None, steps: int) -> torch.Tensor | None:
    """(B, steps) bool: position t of row b is one of its first lengths[b]; None: all are."""
    if lengths is None or bool((lengths >= steps).all()):
        return None
    return torch.arange(steps, device=lengths.device) < lengths.unsqueeze(1)


def on_valid(hs: torch.Tensor, valid: torch.Tensor | None, layer: Callable[[torch.Tensor], torch.Tensor]
             ) -> torch.Tensor:
    """layer applied to the valid positions of hs (B, T, H) only -> (B, T, V), zeros elsewhere."""
    if valid is None:
        return layer(hs)
    out = layer(hs[valid])  # (n, V), n valid positions
    return out.new_zeros(*hs.shape[:2], out.shape[-1]).index_put((valid,), out)


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
