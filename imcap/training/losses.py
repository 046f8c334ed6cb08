"""Training losses for teacher-forced captioning."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, pad_id: int, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean token cross-entropy over non-pad targets (as F.cross_entropy with ignore_index
    and label_smoothing computes it). logits (B, T, V), targets (B, T). Only the valid
    positions are read (the decoders leave zeros at the others)."""
    valid = targets != pad_id  # (B, T)
    if bool(valid.all()):  # no copy
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=label_smoothing)
    return F.cross_entropy(logits[valid], targets[valid], label_smoothing=label_smoothing)


def doubly_stochastic_penalty(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Show-Attend-Tell's regulariser: every grid cell should receive, summed over the
    caption, about one unit of attention. weights (B, T, N), valid (B, T) bool."""
    total = (weights * valid.unsqueeze(-1)).sum(dim=1)  # (B, N)
    return ((1.0 - total) ** 2).mean()
