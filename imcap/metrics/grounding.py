"""Attention grounding: does the model look at the object it names?

For every generated word that names an attribute of an annotated object (on the shapes demo:
its colour or its shape), the peak of that word's attention map is a hit when the centre of
the peak grid cell lies inside a box of an object with that attribute. The chance rate is the
hit rate of a uniformly random cell for the same words, for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

ATTRIBUTES = ("color", "shape")


def cell_centres(cells: int, extent: float) -> torch.Tensor:
    """(N, 2) x, y centres of a square grid of N cells over an image `extent` pixels wide."""
    g = math.isqrt(cells)
    if g * g != cells:
        raise ValueError(f"attention over {cells} cells is not a square grid")
    coords = (torch.arange(g, dtype=torch.float64) + 0.5) * extent / g
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # row-major, as grids are flattened
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def word_targets(word: str, objects: Sequence[dict]) -> list[Sequence[float]]:
    """Boxes of the objects that `word` names (empty when it names none of them)."""
    return [o["box"] for o in objects if any(o.get(a) == word for a in ATTRIBUTES)]


class GroundingRate(Metric):
    """`update(words, attention, objects, extents)`;
    `compute()` -> {"grounding", "grounding_chance", "grounding_words"} (synced across ranks)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("hits", "chance", "words"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        words: Sequence[Sequence[str]],
        attention: torch.Tensor,
        objects: Sequence[Sequence[dict] | None],
        extents: Sequence[float | None],
    ) -> None:
        # words[b]: generated words; attention: (B, L, N) with L >= len(words[b])
        peaks = attention.argmax(dim=-1).cpu()  # (B, L)
        centres = cell_centres(attention.shape[-1], 1.0)  # in units of the image extent
        for b, caption in enumerate(words):
            if not objects[b] or not extents[b]:
                continue
            for t, word in enumerate(caption):
                boxes = word_targets(word, objects[b])
                if not boxes:
                    continue
                inside = torch.zeros(len(centres), dtype=torch.bool)
                for x0, y0, x1, y1 in boxes:
                    scaled = torch.tensor([x0, y0, x1, y1], dtype=torch.float64) / extents[b]
                    inside |= (centres[:, 0] >= scaled[0]) & (centres[:, 0] < scaled[2]) & \
                              (centres[:, 1] >= scaled[1]) & (centres[:, 1] < scaled[3])
                self.hits += float(inside[peaks[b, t]])
                self.chance += float(inside.double().mean())
                self.words += 1

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.words.clamp_min(1)
        return {"grounding": self.hits / n, "grounding_chance": self.chance / n, "grounding_words": self.words}
