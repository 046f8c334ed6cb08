"""Karpathy split files (`dataset_{coco,flickr8k,flickr30k}.json`), the splits papers report on."""

from __future__ import annotations

import json
from pathlib import Path

from imcap.data.records import CaptionRecord
from imcap.data.sources.policy import inside_root
from imcap.errors import ImcapError


def read_karpathy(path: Path, image_dir: Path, restval_to: str = "train") -> list[tuple[CaptionRecord, bool]]:
    """Records (with whether the image file exists) from a Karpathy split file.

    COCO entries carry a `filepath` (train2014/val2014) below `image_dir`; Flickr entries don't.
    `restval` images join `restval_to` (train by default, as in the Karpathy split papers).
    """
    try:
        images = json.loads(path.read_text())["images"]
    except (OSError, ValueError, KeyError) as e:
        raise ImcapError(f"{path}: not a Karpathy split file ({e}); expected {{'images': [...]}}") from e
    out = []
    for k, item in enumerate(images):
        try:
            split = {"restval": restval_to}.get(item["split"], item["split"])
            name = str(Path(item.get("filepath", "")) / item["filename"])
            file = inside_root(image_dir, name, f"{path}: image entry {k}", follow_symlinks=False)
            captions = tuple(s["raw"].strip() for s in item["sentences"])
            image_id = item.get("cocoid", item.get("imgid", item["filename"]))
        except (KeyError, TypeError) as e:
            raise ImcapError(f"{path}: image entry {k} lacks {e}; is this a Karpathy split file?") from e
        out.append((CaptionRecord(image_id, str(file), captions, split), file.is_file()))
    return out
