"""The embedded demo dataset: procedural images of 1-3 coloured shapes with spatial relations.

Every image is drawn from its own seeded generator (seed, split, index), so the dataset is
identical on every machine and independent of how many images are asked for. Each image has
five varied reference captions and keeps its object boxes for grounding evaluation.
Generated on first use into `root/<fingerprint>/` and cached; a new set of parameters gets a
new folder, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from imcap.data.records import SPLITS, CaptionRecord
from imcap.errors import ImcapError
from imcap.registry import register

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.10, "large": 0.19}  # half-extent as a fraction of the image side


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def phrase(self, with_size: bool = True) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


def _place(rng: np.random.Generator, image_size: int, count: int) -> list[Shape]:
    """Rejection-sample `count` non-overlapping shapes with distinct colour+shape pairs."""
    while True:
        shapes: list[Shape] = []
        for _ in range(200):
            if len(shapes) == count:
                if _unambiguous(shapes, image_size):
                    return shapes
                break
            color = str(rng.choice(list(COLORS)))
            kind = str(rng.choice(SHAPES))
            size = str(rng.choice(list(SIZES)))
            if any(s.color == color and s.shape == kind for s in shapes):
                continue
            half = round(SIZES[size] * image_size)
            margin = 2
            cx = int(rng.integers(half + margin, image_size - half - margin))
            cy = int(rng.integers(half + margin, image_size - half - margin))
            box = (cx - half, cy - half, cx + half, cy + half)
            gap = 3
            if any(
                box[0] < s.box[2] + gap and s.box[0] < box[2] + gap
                and box[1] < s.box[3] + gap and s.box[1] < box[3] + gap
                for s in shapes
            ):
                continue
            shapes.append(Shape(color, kind, size, box))


def _unambiguous(shapes: list[Shape], image_size: int) -> bool:
    """Scenes whose captions a viewer could get right: a clear left-to-right order for three
    shapes, a clear dominant axis for the relation of two."""
    min_gap = 0.08 * image_size
    xs = sorted(s.center[0] for s in shapes)
    if len(shapes) == 3:
        return all(b - a >= min_gap for a, b in zip(xs, xs[1:]))
    if len(shapes) == 2:
        (ax, ay), (bx, by) = (s.center for s in shapes)
        return abs(abs(bx - ax) - abs(by - ay)) >= min_gap
    return True


def _draw(shapes: list[Shape], image_size: int, rng: np.random.Generator) -> Image.Image:
    shade = int(rng.integers(235, 256))
    image = Image.new("RGB", (image_size, image_size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        fill = COLORS[s.color]
        x0, y0, x1, y1 = s.box
        if s.shape == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def _relation(a: Shape, b: Shape) -> tuple[str, str]:
    """Relation of a to b and its inverse, along the axis where they differ most."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    if abs(dx) >= abs(dy):
        return ("left of", "right of") if dx > 0 else ("right of", "left of")
    return ("above", "below") if dy > 0 else ("below", "above")


def captions_for(shapes: list[Shape]) -> tuple[str, ...]:
    """Five varied reference captions describing the scene."""
    if len(shapes) == 1:
        (a,) = shapes
        return (
            f"a {a.phrase()}",
            f"there is a {a.phrase()}",
            f"a {a.color} {a.shape} that is {a.size}",
            f"a picture of a {a.phrase()}",
            f"one {a.phrase()} on a white background",
        )
    if len(shapes) == 2:
        a, b = sorted(shapes, key=lambda s: s.center)  # a is the leftmost
        rel, inv = _relation(a, b)
        return (
            f"a {a.phrase()} {rel} a {b.phrase()}",
            f"a {b.phrase()} {inv} a {a.phrase()}",
            f"there is a {a.phrase()} {rel} a {b.phrase()}",
            f"two shapes a {a.phrase()} and a {b.phrase()}",
            f"a {a.phrase(False)} {rel} a {b.phrase(False)}",
        )
    a, b, c = sorted(shapes, key=lambda s: s.center)
    return (
        f"a {a.phrase()} a {b.phrase()} and a {c.phrase()} from left to right",
        f"from left to right a {a.phrase()} a {b.phrase()} and a {c.phrase()}",
        f"three shapes a {a.phrase()} a {b.phrase()} and a {c.phrase()}",
        f"a {a.phrase()} left of a {b.phrase()} and a {c.phrase()}",
        f"a {a.phrase(False)} a {b.phrase(False)} and a {c.phrase(False)}",
    )


@register("source", "shapes")
class ShapesSource:
    """Procedural demo dataset; `num_images` per split, images `image_size` pixels square."""

    def __init__(
        self,
        root: str,
        num_images: Mapping[str, int] = MappingProxyType({"train": 2000, "val": 250, "test": 250}),
        image_size: int = 128,
        max_objects: int = 3,
        seed: int = 0,
    ):
        self.root = Path(root)
        self.num_images = dict(num_images)
        unknown = set(self.num_images) - set(SPLITS)
        if unknown:
            raise ImcapError(f"data.source.num_images has unknown splits {sorted(unknown)}; use {SPLITS}")
        if image_size < 32:
            raise ImcapError(f"data.source.image_size={image_size} is too small; use 32 or more")
        if not 1 <= max_objects <= 3:
            raise ImcapError(f"data.source.max_objects={max_objects}; choose 1, 2 or 3")
        self.image_size = image_size
        self.max_objects = max_objects
        self.seed = seed

    @property
    def folder(self) -> Path:
        params = json.dumps(
            [FORMAT_VERSION, self.num_images, self.image_size, self.max_objects, self.seed],
            sort_keys=True,
        )
        return self.root / f"shapes-{hashlib.sha256(params.encode()).hexdigest()[:12]}"

    def prepare(self) -> None:
        if (self.folder / "annotations.json").is_file():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        total = sum(self.num_images.values())
        log.info("Generating the shapes demo dataset (%d images) into %s", total, self.folder)
        # Build in a temporary sibling and rename: concurrent or interrupted runs never
        # leave a half-written dataset behind.
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".shapes-tmp-"))
        try:
            (tmp / "images").mkdir()
            annotations = []
            image_id = 0
            for split_index, split in enumerate(SPLITS):
                for i in range(self.num_images.get(split, 0)):
                    rng = np.random.default_rng([self.seed, split_index, i])
                    count = int(rng.integers(1, self.max_objects + 1))
                    shapes = _place(rng, self.image_size, count)
                    name = f"{split}_{i:05d}.png"
                    _draw(shapes, self.image_size, rng).save(tmp / "images" / name, compress_level=1)
                    annotations.append({
                        "image_id": image_id,
                        "file_name": name,
                        "split": split,
                        "captions": list(captions_for(shapes)),
                        "objects": [
                            {"color": s.color, "shape": s.shape, "size": s.size, "box": list(s.box)}
                            for s in shapes
                        ],
                    })
                    image_id += 1
            (tmp / "annotations.json").write_text(json.dumps({"images": annotations}), encoding="utf-8")
            try:
                os.rename(tmp, self.folder)
            except OSError:
                if not (self.folder / "annotations.json").is_file():  # lost a race: fine if complete
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def records(self) -> list[CaptionRecord]:
        path = self.folder / "annotations.json"
        if not path.is_file():
            raise ImcapError(f"shapes dataset missing at {path}; call prepare() first (training does)")
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
        return [
            CaptionRecord(
                image_id=item["image_id"],
                image_path=str(self.folder / "images" / item["file_name"]),
                captions=tuple(item["captions"]),
                split=item["split"],
                extra={"objects": item["objects"], "image_size": self.image_size},
            )
            for item in images
        ]
