"""Stripes: procedural images of two-coloured stripes ("red and blue vertical stripes").

A dataset source is two methods: `prepare()` makes the data exist under `root` (here: draws it),
`records()` reads it as imcap's `CaptionRecord`s. Every image is drawn from its own seeded
generator (seed, split, index): the same set on every machine. No network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from imcap.data.records import SPLITS, CaptionRecord
from imcap.errors import ImcapError
from imcap.registry import register

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
DIRECTIONS = ("vertical", "horizontal")


@register("source", "stripes")
class StripesSource:
    """`num_images` per split, `image_size` pixels square, drawn into `root/stripes-<hash>/`."""

    def __init__(self, root: str, num_images: Mapping[str, int] = MappingProxyType({"train": 200, "val": 50, "test": 50}),
                 image_size: int = 64, seed: int = 0):  # the defaults are conf/data/stripes.yaml's
        self.root = Path(root)
        self.num_images = dict(num_images)
        unknown = set(self.num_images) - set(SPLITS)
        if unknown:
            raise ImcapError(f"data.source.num_images has unknown splits {sorted(unknown)}; use {SPLITS}")
        self.image_size, self.seed = image_size, seed

    @property
    def folder(self) -> Path:
        params = json.dumps([self.num_images, self.image_size, self.seed], sort_keys=True)
        return self.root / f"stripes-{hashlib.sha256(params.encode()).hexdigest()[:12]}"

    def prepare(self) -> None:
        if (self.folder / "captions.json").is_file():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".stripes-tmp-"))  # renamed when complete
        try:
            items = []
            for split_index, split in enumerate(SPLITS):
                for i in range(self.num_images.get(split, 0)):
                    name = f"{split}_{i:05d}.png"
                    captions = self._draw(np.random.default_rng([self.seed, split_index, i]), tmp / name)
                    items.append({"file_name": name, "split": split, "captions": captions})
            (tmp / "captions.json").write_text(json.dumps(items), encoding="utf-8")
            try:
                os.rename(tmp, self.folder)
            except OSError:
                if not (self.folder / "captions.json").is_file():  # lost a race: fine if complete
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _draw(self, rng: np.random.Generator, path: Path) -> list[str]:
        first, second = rng.choice(list(COLORS), size=2, replace=False)
        direction = DIRECTIONS[int(rng.integers(2))]
        width = int(rng.integers(4, 12))  # pixels per stripe
        index = np.arange(self.image_size) // width % 2  # 0, 1, 0, 1, ... along one axis
        lines = np.where(index[:, None] == 0, 0, 1)  # (S, 1): horizontal stripes
        mask = np.broadcast_to(lines.T if direction == "vertical" else lines, (self.image_size, self.image_size))
        pixels = np.where(mask[..., None] == 0, COLORS[first], COLORS[second]).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        thin = "thin" if width < 8 else "wide"
        return [f"{first} and {second} {direction} stripes", f"{thin} {direction} stripes of {first} and {second}",
                f"{direction} {first} and {second} stripes"]

    def records(self) -> list[CaptionRecord]:
        path = self.folder / "captions.json"
        if not path.is_file():
            raise ImcapError(f"stripes dataset missing at {path}; call prepare() first (training does)")
        return [CaptionRecord(image_id=i, image_path=str(self.folder / item["file_name"]),
                              captions=tuple(item["captions"]), split=item["split"])
                for i, item in enumerate(json.loads(path.read_text(encoding="utf-8")))]
