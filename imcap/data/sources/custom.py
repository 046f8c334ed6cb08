"""Your own images and captions, in one of two layouts under `root`:

- a captions file (`captions`, relative to `root`): CSV (`.csv`), TSV (`.tsv`) or JSON Lines
  (`.jsonl`) with columns `image`, `caption` and optionally `split` (train/val/test; dev, valid
  and validation mean val). Header names match case- and space-insensitively (` Image ` is
  `image`); an image may have several rows, one per caption (a JSONL `caption` may also be a
  list). With a `split` column every row needs one; without it images are split by a hash.
- a folder of images (`.jpg .jpeg .png .bmp .gif .webp`) each with a same-name `.txt` sidecar
  holding one caption per line. Images below top-level `train/`, `val/` or `test/` folders take
  that split; the others are split by a hash of their path.

`captions: null` uses `root/captions.{csv,tsv,jsonl}` when exactly one exists, else the folder
layout. Image paths resolve against `root` and must stay inside it: absolute paths elsewhere,
`..` that leaves it and symlinks pointing out of it are refused. A caption with no words once
normalised (only emoji, punctuation or symbols) is refused at its file and line: it would be an
empty training target.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from imcap.data.records import SPLITS, CaptionRecord
from imcap.data.sources.splits import split_of
from imcap.data.sources.validation import (
    MISSING_IMAGES,
    check_caption,
    check_choice,
    inside_root,
    keep_existing,
)
from imcap.data.text_files import csv_rows, read_text
from imcap.errors import ImcapError
from imcap.registry import register

log = logging.getLogger(__name__)

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".heic", ".heif", ".hif")  # HEIC: see images.py
SPLIT_ALIASES = {**{s: s for s in SPLITS}, "dev": "val", "valid": "val", "validation": "val"}


def _column(name: str) -> str:
    return re.sub(r"\s+", "", str(name)).lower()


class _Rows:
    """Caption rows gathered per image, checking that each image keeps one split."""

    def __init__(self, root: Path):
        self.root = root
        # image cell -> resolved path: resolved once per image, not per caption row (resolving
        # was 90% of reading a 100k-caption CSV, two realpath calls a row)
        self.paths: dict[str, Path] = {}
        self.captions: dict[Path, list[str]] = defaultdict(list)
        self.splits: dict[Path, tuple[str, str]] = {}  # image -> (split, where it was first given)

    def add(self, image: str, caption: str, split: str | None, where: str) -> None:
        if not image:
            raise ImcapError(f"{where}: empty image cell; give the image path relative to data.root")
        if not caption:
            raise ImcapError(f"{where}: empty caption for {image!r}; fill it in or delete the row")
        check_caption(caption, where)
        path = self.paths.get(image)
        if path is None:
            path = self.paths[image] = inside_root(self.root, image, where)
        if split is not None:
            key = split.strip().lower()
            if key not in SPLIT_ALIASES:
                raise ImcapError(f"{where}: split {split!r} for {image!r}; use train, val or test")
            first = self.splits.setdefault(path, (SPLIT_ALIASES[key], where))
            if first[0] != SPLIT_ALIASES[key]:
                raise ImcapError(f"{where}: {image!r} is in split {SPLIT_ALIASES[key]!r} here but "
                                 f"{first[0]!r} at {first[1]}; give each image one split")
        self.captions[path].append(caption)


def read_table(path: Path, delimiter: str, rows: _Rows) -> bool:
    """CSV/TSV rows into `rows`; whether the file has a split column."""
    rows_of_file = csv_rows(path, delimiter)
    header = [_column(h) for h in next(rows_of_file, (1, []))[1]]
    missing = [c for c in ("image", "caption") if c not in header]
    if missing:
        raise ImcapError(f"{path}:1: no {' or '.join(repr(c) for c in missing)} column (header: "
                         f"{header}); name the columns image, caption[, split]")
    at = {name: header.index(name) for name in ("image", "caption", "split") if name in header}
    for line_num, row in rows_of_file:
        where = f"{path}:{line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ImcapError(f"{where}: {len(row)} cells for {len(header)} columns; quote cells "
                             "that contain the delimiter")
        split = row[at["split"]].strip() if "split" in at else None
        if split == "":
            raise ImcapError(f"{where}: empty split cell; fill in train, val or test (or drop the column)")
        rows.add(row[at["image"]].strip(), row[at["caption"]].strip(), split, where)
    return "split" in at


def read_jsonl(path: Path, rows: _Rows) -> bool:
    """JSON Lines objects into `rows`; whether the objects carry a split (then all must)."""
    has_split: bool | None = None
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            item = {_column(k): v for k, v in json.loads(line).items()}
        except (ValueError, AttributeError) as e:
            raise ImcapError(f"{where}: not a JSON object ({e}); write one object per line") from e
        if has_split is None:
            has_split = "split" in item
        if has_split != ("split" in item):
            raise ImcapError(f"{where}: {'no' if has_split else 'a'} split key, unlike line 1's object; "
                             "give every line a split or none")
        captions = item.get("caption")
        captions = [captions] if isinstance(captions, str) or captions is None else captions
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ImcapError(f"{where}: 'caption' must be a string or a list of strings")
        image = item.get("image")
        if not isinstance(image, str):
            raise ImcapError(f"{where}: 'image' must be a path string relative to data.root")
        for caption in captions or [""]:
            rows.add(image.strip(), (caption or "").strip(),
                     str(item["split"]) if has_split else None, where)
    return bool(has_split)


@register("source", "custom")
class CustomSource:
    """Records from a captions file or an image folder with `.txt` sidecars (module docstring);
    `missing_images`: `error` (default) or `skip` (counted and reported)."""

    def __init__(
        self,
        root: str,
        captions: str | None = None,
        split_ratios: Mapping[str, float] = MappingProxyType({"train": 0.8, "val": 0.1, "test": 0.1}),
        split_seed: int = 0,
        missing_images: str = "error",
    ):
        self.root = Path(root)
        self.captions = captions
        self.split_ratios = dict(split_ratios)
        self.split_seed = split_seed
        self.missing_images = check_choice(missing_images, MISSING_IMAGES, "data.source.missing_images")

    def captions_file(self) -> Path | None:
        """The captions file in use, or None for the image-folder layout."""
        if self.captions:
            path = self.root / self.captions
            if path.suffix.lower() not in FORMATS:
                raise ImcapError(f"data.source.captions={self.captions}: unknown format; use a .csv, .tsv "
                                 "or .jsonl file, or null for images with .txt sidecars")
            if not path.is_file():
                raise ImcapError(f"data.source.captions={self.captions}: {path} does not exist")
            return path
        found = [self.root / f"captions{ext}" for ext in FORMATS if (self.root / f"captions{ext}").is_file()]
        if len(found) > 1:
            raise ImcapError(f"several captions files in {self.root} ({', '.join(p.name for p in found)}); "
                             "choose one with data.source.captions=NAME")
        return found[0] if found else None

    def prepare(self) -> None:
        if not self.root.is_dir():
            raise ImcapError(f"data.root={self.root} does not exist: put your images and captions there, "
                             "or set data.root=DIR to where they are")
        self.captions_file()

    def records(self) -> list[CaptionRecord]:
        self.prepare()
        path = self.captions_file()
        if path is None:
            return self._folder_records()
        rows = _Rows(self.root)
        if FORMATS[path.suffix.lower()] is None:
            read_jsonl(path, rows)
        else:
            read_table(path, FORMATS[path.suffix.lower()], rows)
        if not rows.captions:
            raise ImcapError(f"{path} has no caption rows; add rows 'image,caption[,split]'")
        return keep_existing(self._pairs(rows), self.missing_images, "custom", str(path))

    def _pairs(self, rows: _Rows) -> list[tuple[CaptionRecord, bool]]:
        real_root = self.root.resolve()
        pairs = []
        for image in sorted(rows.captions):
            image_id = image.relative_to(real_root).as_posix()
            split = rows.splits[image][0] if image in rows.splits else \
                split_of(image_id, self.split_ratios, self.split_seed)
            pairs.append((CaptionRecord(image_id, str(image), tuple(rows.captions[image]), split), image.is_file()))
        return pairs

    def _folder_records(self) -> list[CaptionRecord]:
        """Images with `.txt` sidecars; a sidecar without its image follows `missing_images`."""
        rows = _Rows(self.root)
        sidecars: set[Path] = set()
        images: set[Path] = set()
        for path in self._walk():
            if path.suffix.lower() == ".txt":
                sidecars.add(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                images.add(path)
        stems = {p.with_suffix("") for p in images}
        uncaptioned = []
        for image in sorted(images):
            sidecar = image.with_suffix(".txt")
            lines = []
            if sidecar in sidecars:
                inside_root(self.root, str(sidecar.relative_to(self.root)), str(sidecar))
                lines = [(n, ln.strip()) for n, ln in enumerate(read_text(sidecar).splitlines(), 1) if ln.strip()]
            if not lines:
                uncaptioned.append(image)
            for n, caption in lines:
                rows.add(str(image.relative_to(self.root)), caption, self._folder_split(image), f"{sidecar}:{n}")
        if uncaptioned:
            log.warning("Left out %d of %d images in %s that have no (or an empty) .txt sidecar (first: %s)",
                        len(uncaptioned), len(images), self.root, uncaptioned[0])
        orphans = sorted(s for s in sidecars if s.with_suffix("") not in stems)  # captions, image gone
        if orphans and self.missing_images == "error":
            raise ImcapError(f"{len(orphans)} .txt sidecars under {self.root} have no image beside them "
                             f"(first: {orphans[0]}); add the images or set data.source.missing_images=skip")
        if orphans:
            log.warning("Skipped %d .txt sidecars under %s that have no image beside them (first: %s)",
                        len(orphans), self.root, orphans[0])
        if not rows.captions:
            raise ImcapError(f"no captioned images under data.root={self.root}: add a captions.csv "
                             "(image,caption) or a .txt sidecar with one caption per line beside each image")
        return keep_existing(self._pairs(rows), self.missing_images, "custom", str(self.root))

    def _folder_split(self, path: Path) -> str | None:
        top = path.relative_to(self.root).parts[0].lower()
        return top if top in SPLITS and len(path.relative_to(self.root).parts) > 1 else None

    def _walk(self) -> list[Path]:
        """Files below root (hidden folders such as the feature cache skipped), following symlinked
        folders only where they stay inside root."""
        real_root = self.root.resolve()
        seen, out = set(), []
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            real = Path(folder).resolve()
            if not real.is_relative_to(real_root):
                raise ImcapError(f"{folder} is a symlink to {real}, outside data.root={self.root}; "
                                 "copy the images under the root instead")
            if real in seen:  # a symlink loop
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            out += [Path(folder) / name for name in sorted(files) if not name.startswith(".")]
        return out
