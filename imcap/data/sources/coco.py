"""MS COCO captions: the official annotation JSONs, or the Karpathy split file.

Auto-detected under `root`:
- Karpathy: `dataset_coco.json` with images in `train2014/` and `val2014/` (restval joins train);
- official: `annotations/captions_{train,val}{year}.json` with `{train,val}{year}/`. The official
  val set is split deterministically in half (by image id) into val and test.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from imcap.data.records import CaptionRecord
from imcap.data.sources.karpathy import read_karpathy
from imcap.data.sources.policy import MISSING_IMAGES, check_choice, inside_root, keep_existing
from imcap.data.sources.splits import split_of
from imcap.data.textfile import load_json, require_str
from imcap.errors import ImcapError
from imcap.registry import register

log = logging.getLogger(__name__)


def read_official(path: Path, image_dir: Path) -> list[tuple[CaptionRecord, bool]]:
    """Records from one official captions file; split is left empty for the caller."""
    data = load_json(path)
    try:
        files = {im["id"]: require_str(im["file_name"], f"{path}: image id {im['id']}", "file_name")
                 for im in data["images"]}
        captions: dict[int, list[str]] = defaultdict(list)
        for k, ann in enumerate(data["annotations"]):
            caption = require_str(ann["caption"], f"{path}: annotation {k} (image id {ann['image_id']})", "caption")
            captions[ann["image_id"]].append(caption.strip())
    except (KeyError, TypeError) as e:
        raise ImcapError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from e
    unknown = set(captions) - set(files)
    if unknown:
        raise ImcapError(f"{path}: {len(unknown)} annotations name image ids missing from 'images' (e.g. {min(unknown)})")
    for i in sorted(captions):  # a file name leading out of the image folder is never read
        inside_root(image_dir, str(files[i]), f"{path}: image id {i}", follow_symlinks=False)
    return [
        (CaptionRecord(i, str(image_dir / files[i]), tuple(captions[i]), ""), (image_dir / files[i]).is_file())
        for i in sorted(captions)
    ]


@register("source", "coco")
class CocoSource:
    """COCO caption records; `missing_images`: `error` or `skip` (counted and reported)."""

    name = "coco"

    def __init__(self, root: str, year: int = 2014, restval_to: str = "train", missing_images: str = "error"):
        self.root = Path(root)
        if int(year) not in (2014, 2017):
            raise ImcapError(f"data.source.year={year}; choose 2014 or 2017")
        self.year, self.restval_to = int(year), restval_to
        self.missing_images = check_choice(missing_images, MISSING_IMAGES, "data.source.missing_images")

    def _official(self, part: str) -> Path:
        return self.root / "annotations" / f"captions_{part}{self.year}.json"

    def prepare(self) -> None:
        if not self.root.is_dir():
            raise ImcapError(f"data.source.root={self.root} does not exist: download MS COCO there "
                             f"(annotations/captions_train{self.year}.json, train{self.year}/, val{self.year}/)")
        if not (self.root / "dataset_coco.json").is_file() and not self._official("train").is_file():
            raise ImcapError(f"no COCO captions under data.source.root={self.root}: place dataset_coco.json "
                             f"(Karpathy) or annotations/captions_train{self.year}.json there")

    def records(self) -> list[CaptionRecord]:
        self.prepare()
        karpathy = self.root / "dataset_coco.json"
        if karpathy.is_file():
            pairs = read_karpathy(karpathy, self.root, self.restval_to)
        else:
            pairs = []
            for part in ("train", "val"):
                path = self._official(part)
                if not path.is_file():
                    continue
                for record, exists in read_official(path, self.root / f"{part}{self.year}"):
                    split = "train" if part == "train" else split_of(str(record.image_id), {"val": 1, "test": 1})
                    pairs.append((CaptionRecord(record.image_id, record.image_path, record.captions, split), exists))
        return keep_existing(pairs, self.missing_images, "COCO", None)
