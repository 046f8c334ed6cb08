"""Attention grounding: does the model look at the object it names?

For every generated word that names an attribute of an annotated object (on the shapes demo:
its colour or its shape), the peak of that word's attention map is a hit when the centre of
the peak grid cell lies inside a box of an object with that attribute. The chance rate is the
hit rate of a uniformly random cell for the same words, for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

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
    """`update(words, attention, objects, extents, index)`;
    `compute()` -> {"grounding", "grounding_chance", "grounding_words"} (synced across ranks).

    Counts are kept per image, with its dataset index, and an image seen twice counts once: a
    DDP sampler pads the last batches with repeated images, which would otherwise weigh twice
    (as the corpus metrics, this keeps a 2-process evaluation equal to a 1-process one)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("index", [], dist_reduce_fx="cat")  # (images,) dataset index of each image
        self.add_state("counts", [], dist_reduce_fx="cat")  # (images, 3) hits, chance, words

    def update(
        self,
        words: Sequence[Sequence[str]],
        attention: torch.Tensor,
        objects: Sequence[Sequence[dict] | None],
        extents: Sequence[float | None],
        index: Sequence[int] | torch.Tensor,
    ) -> None:
        # words[b]: generated words; attention: (B, L, N) with L >= len(words[b]); index: (B,)
        peaks = attention.argmax(dim=-1).cpu()  # (B, L)
        centres = cell_centres(attention.shape[-1], 1.0)  # in units of the image extent
        for b, caption in enumerate(words):
            if not objects[b] or not extents[b]:
                continue
            counts = torch.zeros(3, dtype=torch.float64)  # hits, chance, words of this image
            for t, word in enumerate(caption):
                boxes = word_targets(word, objects[b])
                if not boxes:
                    continue
                inside = torch.zeros(len(centres), dtype=torch.bool)
                for x0, y0, x1, y1 in boxes:
                    scaled = torch.tensor([x0, y0, x1, y1], dtype=torch.float64) / extents[b]
                    inside |= (centres[:, 0] >= scaled[0]) & (centres[:, 0] < scaled[2]) & \
                              (centres[:, 1] >= scaled[1]) & (centres[:, 1] < scaled[3])
                counts += torch.stack([inside[peaks[b, t]].double(), inside.double().mean(), torch.tensor(1.0)])
            self.index.append(torch.tensor([int(index[b])], dtype=torch.long, device=self.device))
            self.counts.append(counts.view(1, 3).to(self.device))

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any = None) -> None:
        # a rank that saw no annotated image sends empty states of the others' dtypes and widths
        if isinstance(self.index, list) and not self.index:
            self.index = [torch.zeros(0, dtype=torch.long, device=self.device)]
            self.counts = [torch.zeros(0, 3, dtype=torch.float64, device=self.device)]
        super()._sync_dist(dist_sync_fn, process_group)

    def totals(self) -> torch.Tensor:
        """(3,) hits, chance, words summed over distinct images."""
        if not (isinstance(self.index, torch.Tensor) or self.index):
            return torch.zeros(3, dtype=torch.float64)
        index, counts = dim_zero_cat(self.index).cpu(), dim_zero_cat(self.counts).cpu().view(-1, 3)
        first = np.unique(index.numpy(), return_index=True)[1]  # an image's first record
        return counts[torch.from_numpy(first)].sum(dim=0)

    def compute(self) -> dict[str, torch.Tensor]:
        hits, chance, words = self.totals()
        n = words.clamp_min(1)
        return {"grounding": hits / n, "grounding_chance": chance / n, "grounding_words": words}
