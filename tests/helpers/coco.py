"""A COCO root in the official layout: annotations/captions_{part}{year}.json and image folders."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tests.helpers.images import write_image


def write_official(root: Path, part: str, ids: Sequence[int], year: int = 2014, size: int = 8,
                   captions: Sequence[str] | None = None) -> Path:
    """`part`'s captions file with five captions per image id, and an image per id; its path.

    `captions`: the captions every image gets (default: "caption k of ID")."""
    images = [{"id": i, "file_name": f"COCO_{part}{year}_{i:012d}.jpg"} for i in ids]
    texts = {i: list(captions) if captions else [f"caption {k} of {i} " for k in range(5)] for i in ids}
    anns = [{"id": 10 * i + k, "image_id": i, "caption": text} for i in ids for k, text in enumerate(texts[i])]
    path = root / "annotations" / f"captions_{part}{year}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    for k, im in enumerate(images):
        write_image(root / f"{part}{year}" / im["file_name"], (40 * k % 256, 90, 160), size)
    return path
