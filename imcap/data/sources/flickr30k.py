"""Flickr30k in the layouts people download.

Captions, auto-detected under `root` (first match wins):
- Karpathy: `dataset_flickr30k.json` (its train/val/test splits win);
- official: `results_20130124.token` (`<image>#<n>\\t<caption>`);
- Kaggle: `results.csv` (`image_name| comment_number| comment`: pipe-separated, stray spaces
  in header and cells), in `root/` or in `root/flickr30k_images/` where the Kaggle zip puts it.
Images: `flickr30k_images/`, the Kaggle zip's nested `flickr30k_images/flickr30k_images/`, or the
official tarball's `flickr30k-images/`: whichever holds the first captioned image.
Without the Karpathy file, images are split deterministically by a hash of their name.

The real Kaggle `results.csv` has broken rows, e.g. one whose comment is merged into the number
cell (`2199200615.jpg| 4 A dog runs across the grass .`). `bad_rows` decides what happens:
`repair` (default) splits such merged cells back, reporting each by file:line, and stops at any
other broken row; `skip` leaves out every broken row and reports how many; `error` stops at the
first broken row.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from imcap.data.records import CaptionRecord
from imcap.data.resources import Resource, karpathy_split
from imcap.data.sources import validation
from imcap.data.sources.flickr8k import read_official_tokens
from imcap.data.sources.karpathy import read_karpathy
from imcap.data.sources.splits import split_of
from imcap.data.tokenizer import normalize
from imcap.errors import ImcapError
from imcap.registry import register

log = logging.getLogger(__name__)

KARPATHY = "dataset_flickr30k.json"
OFFICIAL_TOKENS = "results_20130124.token"
KAGGLE_CAPTIONS = ("results.csv", "flickr30k_images/results.csv")
# the Kaggle zip nests the images one level deeper than its name suggests; checked first
IMAGE_DIRS = ("flickr30k_images/flickr30k_images", "flickr30k_images", "flickr30k-images")
KAGGLE_HEADER = ["image_name", "comment_number", "comment"]
# The images are behind a sign-up; the Kaggle zip has unknown size and sha256 (not checked).
RESOURCES = (
    karpathy_split(KARPATHY),
    Resource("flickr-image-dataset.zip", None,
             present=IMAGE_DIRS[1:],  # the Kaggle zip's folder, the official tarball's
             manual="`kaggle datasets download hsankesara/flickr-image-dataset` (Kaggle account), "
                    "or extract the official flickr30k-images.tar.gz (form at "
                    "https://shannon.cs.illinois.edu/DenotationGraph/) into the root"),
)
BAD_ROWS = ("repair", "skip", "error")

_MERGED = re.compile(r"^(\d+)\s+(\S.*)$")  # "4 A dog runs ." in the comment_number cell


def _parse_row(line: str) -> tuple[str, str, str]:
    """(image, caption, problem) for one data row; a repairable problem keeps image and caption."""
    cells = [c.strip() for c in line.split("|", 2)]  # a '|' inside a comment stays in the comment
    image = cells[0]
    if not image:
        return "", "", "no image name"
    if len(cells) == 3 and cells[1].isdigit():
        if not normalize(cells[2]):  # nothing to train on: empty, or only punctuation or emoji
            return "", "", "empty comment" if not cells[2] else "a comment with no words"
        return image, cells[2], ""
    merged = _MERGED.match(cells[1]) if len(cells) >= 2 else None
    if merged and (len(cells) == 2 or not cells[2]):
        return image, merged.group(2), "repairable"
    if len(cells) == 3:
        return "", "", f"comment_number {cells[1]!r} is not a number"
    return "", "", f"expected 3 '|'-separated cells, got {len(cells)}"


def read_kaggle_results(path: Path, bad_rows: str = "repair") -> dict[str, list[str]]:
    """Captions by image name from Kaggle's pipe-separated `results.csv`."""
    validation.check_choice(bad_rows, BAD_ROWS, "data.source.bad_rows")
    captions: dict[str, list[str]] = defaultdict(list)
    repaired: list[int] = []
    skipped: list[tuple[int, str]] = []
    with open(path, "rb") as f:  # bytes, so that a decoding error can name its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ImcapError(f"{path}:{lineno}: not UTF-8 ({e.reason}); re-save the file as UTF-8") from e
            if lineno == 1:
                header = [h.strip().lower() for h in line.split("|")]
                if header != KAGGLE_HEADER:
                    raise ImcapError(f"{path}:1: expected the header 'image_name| comment_number| comment', "
                                     f"got {line[:80]!r}")
                continue
            if "\0" in line:
                raise ImcapError(f"{path}:{lineno}: a NUL byte; the file is binary or damaged: remove the byte "
                                 "or re-export the file as text")
            if not line.strip():
                continue
            image, caption, problem = _parse_row(line)
            if problem == "repairable" and bad_rows == "repair":
                repaired.append(lineno)
            elif problem and bad_rows == "skip":
                skipped.append((lineno, problem))
                continue
            elif problem:
                fix = "data.source.bad_rows=skip"
                if problem == "repairable":
                    problem, fix = "the comment is merged into the comment_number column", \
                        "data.source.bad_rows=repair (or skip)"
                raise ImcapError(f"{path}:{lineno}: {problem} ({line.strip()[:60]!r}); fix the line or set {fix}")
            validation.inside_root(Path(), image, f"{path}:{lineno}", follow_symlinks=False)
            captions[image].append(caption)
    if repaired:
        log.warning("Repaired %d rows of %s whose comment was merged into the comment_number column "
                    "(lines %s)", len(repaired), path, ", ".join(map(str, repaired[:10])))
    if skipped:
        log.warning("Skipped %d broken rows of %s (data.source.bad_rows=skip; first: line %d, %s)",
                    len(skipped), path, *skipped[0])
    return captions


@register("source", "flickr30k")
class Flickr30kSource:
    """Flickr30k records; `missing_images`: `error` or `skip`; `bad_rows` (Kaggle CSV):
    `repair`, `skip` or `error` (see the module docstring). Skipped data is counted and reported."""

    def __init__(
        self,
        root: str,
        split_ratios: Mapping[str, float] = MappingProxyType({"train": 0.94, "val": 0.03, "test": 0.03}),
        split_seed: int = 0,
        missing_images: str = "error",
        bad_rows: str = "repair",
    ):
        self.root = Path(root)
        self.split_ratios = dict(split_ratios)
        self.split_seed = split_seed
        self.missing_images = validation.check_choice(missing_images, validation.MISSING_IMAGES, "data.source.missing_images")
        self.bad_rows = validation.check_choice(bad_rows, BAD_ROWS, "data.source.bad_rows")

    def _captions_file(self) -> Path:
        for name in (KARPATHY, OFFICIAL_TOKENS, *KAGGLE_CAPTIONS):
            if (self.root / name).is_file():
                return self.root / name
        raise ImcapError(
            f"no Flickr30k captions under data.root={self.root}: place {KARPATHY} (Karpathy), "
            f"{OFFICIAL_TOKENS} (official) or results.csv (Kaggle) there with the images in "
            f"flickr30k_images/, or fetch them with `{validation.fetch_command('flickr30k', self.root)}`"
        )

    def _image_dir(self, first_image: str | None) -> Path:
        """The candidate folder that holds the first captioned image (else the first that exists)."""
        folders = [self.root / d for d in IMAGE_DIRS if (self.root / d).is_dir()]
        for folder in folders:
            if first_image and (folder / first_image).is_file():
                return folder
        return folders[0] if folders else self.root / "flickr30k_images"

    def resources(self) -> tuple[Resource, ...]:
        return RESOURCES

    def prepare(self) -> None:
        if not self.root.is_dir():
            raise validation.missing_root(self.root, "Flickr30k", validation.fetch_command("flickr30k", self.root))
        self._captions_file()

    def records(self) -> list[CaptionRecord]:
        self.prepare()
        path = self._captions_file()
        if path.name == KARPATHY:
            # image paths come back relative (Flickr entries carry no folder); anchor them below
            pairs = [(r, False) for r, _ in read_karpathy(path, Path())]
            image_dir = self._image_dir(pairs[0][0].image_path if pairs else None)
            pairs = [(replace(r, image_path=str(image_dir / r.image_path)), (image_dir / r.image_path).is_file())
                     for r, _ in pairs]
            return validation.keep_existing(pairs, self.missing_images, "Flickr30k", str(path))
        captions = (read_official_tokens(path) if path.name == OFFICIAL_TOKENS
                    else read_kaggle_results(path, self.bad_rows))
        names = sorted(captions)
        image_dir = self._image_dir(names[0] if names else None)
        pairs = [
            (CaptionRecord(name, str(image_dir / name), tuple(captions[name]),
                           split_of(name, self.split_ratios, self.split_seed)),
             (image_dir / name).is_file())
            for name in names
        ]
        return validation.keep_existing(pairs, self.missing_images, "Flickr30k", str(path))
