"""MS COCO captions: the official annotation JSONs, or the Karpathy split file.

Auto-detected under `root`:
- Karpathy: `dataset_coco.json` with images in `train2014/` and `val2014/` (restval joins train);
- official: `annotations/captions_{train,val}{year}.json` with `{train,val}{year}/`. The official
  val set is split deterministically in half (by image id) into val and test.
`year` null (the default) takes the one year whose files are there (the Karpathy file counts as
2014, whose images it names) and asks for `data.source.year` when both are.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from imcap.data.records import CaptionRecord
from imcap.data.resources import Resource, karpathy_split
from imcap.data.sources import validation
from imcap.data.sources.karpathy import read_karpathy
from imcap.data.sources.splits import split_of
from imcap.data.text_files import load_json, require_str
from imcap.errors import ImcapError
from imcap.registry import register

log = logging.getLogger(__name__)

YEARS = (2014, 2017)
KARPATHY = "dataset_coco.json"  # Karpathy's split of the 2014 images


def annotation_file(part: str, year: int) -> str:
    """The official captions file of `part` (train | val), relative to the root."""
    return f"annotations/captions_{part}{year}.json"


def image_folder(part: str, year: int) -> str:
    """The folder of `part`'s images (train | val), relative to the root; also its zip's name."""
    return f"{part}{year}"


def read_official(path: Path, image_dir: Path) -> list[tuple[CaptionRecord, bool]]:
    """Records from one official captions file; split is left empty for the caller."""
    data = load_json(path)
    try:
        files: dict[int, str] = {}
        for im in data["images"]:
            name = require_str(im["file_name"], f"{path}: image id {im['id']}", "file_name")
            if files.setdefault(im["id"], name) != name:  # whose captions would these be?
                raise ImcapError(f"{path}: image id {im['id']} is listed twice in 'images', as {files[im['id']]!r} "
                                 f"and {name!r}; its captions would go to one of them: give each image its own id")
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
        validation.inside_root(image_dir, str(files[i]), f"{path}: image id {i}", follow_symlinks=False)
    return [
        (CaptionRecord(i, str(image_dir / files[i]), tuple(captions[i]), ""), (image_dir / files[i]).is_file())
        for i in sorted(captions)
    ]


_HOST = "http://images.cocodataset.org"
# Sizes and sha256 of the zips as images.cocodataset.org serves them (COCO publishes no
# checksums; these are the values torchvision's dataset code and independent downloads record):
# year -> (annotations, val images, train images) as (size, sha256).
_ZIPS = {
    2014: ((252_872_794, "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009"),
           (6_645_013_297, "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0"),
           (13_510_573_713, "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775")),
    2017: ((252_907_541, "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268"),
           (815_585_330, "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05"),
           (19_336_861_798, "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929")),
}


def resources(year: int) -> tuple[Resource, ...]:
    """The zips of one COCO year, small ones first so that a wrong setup fails before the big
    downloads; Karpathy's split names 2014 files, so it comes with 2014 only."""
    notes, val, train = _ZIPS[year]
    name = f"annotations_trainval{year}.zip"
    files = [Resource(name, f"{_HOST}/annotations/{name}", *notes, present=(annotation_file("train", year),))]
    for part, (size, sha256) in (("val", val), ("train", train)):
        folder = image_folder(part, year)  # the zip holds that folder
        files.append(Resource(f"{folder}.zip", f"{_HOST}/zips/{folder}.zip", size, sha256, present=(folder,)))
    return (karpathy_split(KARPATHY),) * (year == 2014) + tuple(files)


@register("source", "coco")
class CocoSource:
    """COCO caption records; `year`: 2014, 2017 or null (found on disk); `missing_images`:
    `error` or `skip` (counted and reported)."""

    def __init__(self, root: str, year: int | None = None, restval_to: str = "train",
                 missing_images: str = "error"):
        self.root = Path(root)
        if year is not None and int(year) not in YEARS:
            raise ImcapError(f"data.source.year={year}; choose 2014 or 2017 (or null: the year found under data.root)")
        self.requested_year = int(year) if year is not None else None
        self.restval_to = restval_to
        self.missing_images = validation.check_choice(missing_images, validation.MISSING_IMAGES, "data.source.missing_images")

    def _years_present(self) -> list[int]:
        return [y for y in YEARS if (self.root / annotation_file("train", y)).is_file()
                or (y == 2014 and (self.root / KARPATHY).is_file())]

    @property
    def year(self) -> int:
        """The year read: as requested, else the only one under the root (2014 when none is)."""
        if self.requested_year is not None:
            return self.requested_year
        present = self._years_present()
        if len(present) > 1:
            raise ImcapError(f"COCO {' and '.join(map(str, present))} are both under data.root={self.root}; "
                             "choose one with data.source.year=2014 or data.source.year=2017")
        return present[0] if present else 2014

    def _fetch(self) -> str:
        return validation.fetch_command("coco", self.root, *([f"data.source.year={self.year}"] if self.year != 2014 else []))

    def resources(self) -> tuple[Resource, ...]:
        return resources(self.year)  # as requested or found under the root

    def prepare(self) -> None:
        if not self.root.is_dir():
            raise validation.missing_root(self.root, "MS COCO", self._fetch())
        year = self.year
        expected = [annotation_file("train", year), *([KARPATHY] if year == 2014 else [])]
        if not any((self.root / name).is_file() for name in expected):
            raise ImcapError(f"no COCO {year} captions under data.root={self.root}: place "
                             f"{' or '.join(expected)} there, or fetch them with `{self._fetch()}`")

    def records(self) -> list[CaptionRecord]:
        self.prepare()
        year = self.year
        karpathy = self.root / KARPATHY
        if karpathy.is_file() and year == 2014:
            pairs = read_karpathy(karpathy, self.root, self.restval_to)
        else:
            pairs = []
            for part in ("train", "val"):
                path = self.root / annotation_file(part, year)
                if not path.is_file():
                    continue
                for record, exists in read_official(path, self.root / image_folder(part, year)):
                    split = "train" if part == "train" else split_of(str(record.image_id), {"val": 1, "test": 1})
                    pairs.append((CaptionRecord(record.image_id, record.image_path, record.captions, split), exists))
        return validation.keep_existing(pairs, self.missing_images, "COCO", None)
