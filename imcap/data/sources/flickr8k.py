"""Flickr8k in the layouts people download: the official token file or Kaggle's captions.txt.

Auto-detected under `root`:
- official: `Flickr8k.token.txt` (`<image>#<n>\\t<caption>`), images in `Flicker8k_Dataset/`
  (sic), optional `Flickr_8k.{train,dev,test}Images.txt` split files;
- Kaggle: `captions.txt` (CSV, header `image,caption`, quoted commas allowed), images in `Images/`;
- Karpathy: `dataset_flickr8k.json` (its splits win), images in either folder above.
Without split files, images are split deterministically by a hash of their name.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from imcap.data.records import CaptionRecord
from imcap.data.resources import Resource, karpathy_split
from imcap.data.sources import validation
from imcap.data.sources.karpathy import read_karpathy
from imcap.data.sources.splits import split_of
from imcap.data.text_files import csv_rows, read_text
from imcap.errors import ImcapError
from imcap.registry import register

log = logging.getLogger(__name__)

OFFICIAL_TOKENS = "Flickr8k.token.txt"
OFFICIAL_IMAGES = "Flicker8k_Dataset"
OFFICIAL_SPLITS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                   "test": "Flickr_8k.testImages.txt"}
KAGGLE_CAPTIONS = "captions.txt"
KAGGLE_IMAGES = "Images"
KARPATHY = "dataset_flickr8k.json"
_HOST = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
# Jason Brownlee's public copy of the official distribution (token file, split files,
# Flicker8k_Dataset/); sizes and sha256 are not recorded here: not checked. Kaggle's copy
# (captions.txt, Images/) counts as present too.
RESOURCES = (
    karpathy_split(KARPATHY),
    Resource("Flickr8k_text.zip", f"{_HOST}/Flickr8k_text.zip", present=(OFFICIAL_TOKENS, KAGGLE_CAPTIONS)),
    Resource("Flickr8k_Dataset.zip", f"{_HOST}/Flickr8k_Dataset.zip", present=(OFFICIAL_IMAGES, KAGGLE_IMAGES)),
)


def read_official_tokens(path: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = defaultdict(list)
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        key, sep, caption = line.rstrip("\r").partition("\t")
        image, hash_sign, _ = key.partition("#")
        if not sep or not hash_sign or not image or not caption.strip():
            raise ImcapError(f"{path}:{lineno}: expected '<image>#<n>\\t<caption>', got {line.strip()[:60]!r}")
        validation.inside_root(Path(), image, f"{path}:{lineno}", follow_symlinks=False)  # checked before any read
        captions[image].append(validation.check_caption(caption.strip(), f"{path}:{lineno}"))
    return captions


def read_kaggle_captions(path: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = defaultdict(list)
    rows = csv_rows(path)
    header = [h.strip().lower() for h in next(rows, (1, []))[1]]
    if header[:2] != ["image", "caption"]:
        raise ImcapError(f"{path}:1: expected the header 'image,caption', got {','.join(header)!r}")
    for line_num, row in rows:
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ImcapError(f"{path}:{line_num}: expected 'image,caption' (quote captions with commas), got {row!r}")
        validation.inside_root(Path(), row[0].strip(), f"{path}:{line_num}", follow_symlinks=False)
        captions[row[0].strip()].append(validation.check_caption(row[1].strip(), f"{path}:{line_num}"))
    return captions


@register("source", "flickr8k")
class Flickr8kSource:
    """Flickr8k records; `missing_images`: `error` (default) or `skip` (counted and reported)."""

    def __init__(
        self,
        root: str,
        split_ratios: Mapping[str, float] = MappingProxyType({"train": 0.8, "val": 0.1, "test": 0.1}),
        split_seed: int = 0,
        missing_images: str = "error",
    ):
        self.root = Path(root)
        self.split_ratios = dict(split_ratios)
        self.split_seed = split_seed
        self.missing_images = validation.check_choice(missing_images, validation.MISSING_IMAGES, "data.source.missing_images")

    def _layout(self) -> tuple[dict[str, list[str]], Path, Path]:
        if (self.root / KARPATHY).is_file():
            return {}, self._image_dir(), self.root / KARPATHY
        if (self.root / OFFICIAL_TOKENS).is_file():
            path = self.root / OFFICIAL_TOKENS
            return read_official_tokens(path), self.root / OFFICIAL_IMAGES, path
        if (self.root / KAGGLE_CAPTIONS).is_file():
            path = self.root / KAGGLE_CAPTIONS
            return read_kaggle_captions(path), self.root / KAGGLE_IMAGES, path
        raise ImcapError(
            f"no Flickr8k captions under data.root={self.root}: place {OFFICIAL_TOKENS} with "
            f"{OFFICIAL_IMAGES}/ (official) or {KAGGLE_CAPTIONS} with {KAGGLE_IMAGES}/ (Kaggle) there, "
            f"or fetch them with `{validation.fetch_command('flickr8k', self.root)}`"
        )

    def _image_dir(self) -> Path:
        official = self.root / OFFICIAL_IMAGES
        return official if official.is_dir() else self.root / KAGGLE_IMAGES

    def resources(self) -> tuple[Resource, ...]:
        return RESOURCES

    def prepare(self) -> None:
        if not self.root.is_dir():
            raise validation.missing_root(self.root, "Flickr8k", validation.fetch_command("flickr8k", self.root))
        self._layout()

    def _official_splits(self) -> dict[str, str]:
        split_of_image = {}
        for split, name in OFFICIAL_SPLITS.items():
            path = self.root / name
            if path.is_file():
                for line in read_text(path).split():
                    split_of_image[line.strip()] = split
        return split_of_image

    def records(self) -> list[CaptionRecord]:
        captions, image_dir, captions_path = self._layout()
        if captions_path.name == KARPATHY:
            pairs = read_karpathy(captions_path, image_dir)
        else:
            official = self._official_splits()
            pairs, unlisted = [], 0
            for image in sorted(captions):
                split = official.get(image) if official else split_of(image, self.split_ratios, self.split_seed)
                if split is None:  # the official split files leave some images out on purpose
                    unlisted += 1
                    continue
                path = image_dir / image
                pairs.append((CaptionRecord(image, str(path), tuple(captions[image]), split), path.is_file()))
            if unlisted:
                log.info("%d Flickr8k images are in no official split file and were left out", unlisted)
        return validation.keep_existing(pairs, self.missing_images, "Flickr8k", str(captions_path))
