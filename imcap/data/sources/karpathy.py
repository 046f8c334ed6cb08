"""Karpathy split files (`dataset_{coco,flickr8k,flickr30k}.json`), the splits papers report on."""

from __future__ import annotations

from pathlib import Path

from imcap.data.records import CaptionRecord
from imcap.data.sources.validation import inside_root
from imcap.data.text_files import load_json, require_str
from imcap.errors import ImcapError


def read_karpathy(path: Path, image_dir: Path, restval_to: str = "train") -> list[tuple[CaptionRecord, bool]]:
    """Records (with whether the image file exists) from a Karpathy split file.

    COCO entries carry a `filepath` (train2014/val2014) below `image_dir`; Flickr entries don't.
    `restval` images join `restval_to` (train by default, as in the Karpathy split papers).
    """
    try:
        images = load_json(path)["images"]
    except (KeyError, TypeError) as e:
        raise ImcapError(f"{path}: not a Karpathy split file ({e}); expected {{'images': [...]}}") from e
    out = []
    for k, item in enumerate(images):
        try:
            split = {"restval": restval_to}.get(item["split"], item["split"])
            where = f"{path}: image entry {k}"
            name = str(Path(require_str(item.get("filepath", ""), where, "filepath"))
                       / require_str(item["filename"], where, "filename"))
            file = inside_root(image_dir, name, where, follow_symlinks=False)
            captions = tuple(require_str(s["raw"], f"{path}: image entry {k}, sentence {j}", "raw").strip()
                             for j, s in enumerate(item["sentences"]))
            image_id = item.get("cocoid", item.get("imgid", item["filename"]))
        except (KeyError, TypeError) as e:
            raise ImcapError(f"{path}: image entry {k} lacks {e}; is this a Karpathy split file?") from e
        out.append((CaptionRecord(image_id, str(file), captions, split), file.is_file()))
    return out
