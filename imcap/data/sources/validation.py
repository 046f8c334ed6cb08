"""What readers do with data they cannot use as is: stop with a clear error, or skip and report;
and what they say when the data is not there at all.

A caption with no words once normalised (only punctuation, symbols or emoji: `imcap.data.tokenizer`)
would be an empty training target and an empty reference. Readers of files people write by hand
refuse it at its line (`check_caption`); `keep_existing`, which every reader ends with, leaves
out and counts any that remain (a public dataset's stray rows), and images left with none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from imcap.data.records import CaptionRecord
from imcap.data.tokenizer import normalize
from imcap.errors import ImcapError

log = logging.getLogger(__name__)

MISSING_IMAGES = ("error", "skip")


def check_choice(value: str, choices: Sequence[str], option: str) -> str:
    """`value` if it is one of `choices`, else a one-line error naming the option."""
    if value not in choices:
        raise ImcapError(f"{option}={value!r}; use {' or '.join(repr(c) for c in choices)}")
    return value


def check_caption(caption: str, where: str) -> str:
    """`caption` if it has words once normalised, else a one-line error naming `where`."""
    if not normalize(caption):
        what = "is empty" if not caption.strip() else \
            f"{caption.strip()[:40]!r} has no words once normalised (only punctuation, symbols or emoji)"
        raise ImcapError(f"{where}: caption {what}; write the caption in words or delete the row")
    return caption


def _keep_worded(pairs: Sequence[tuple[CaptionRecord, bool]], dataset: str,
                 named: str) -> list[tuple[CaptionRecord, bool]]:
    """The pairs with their wordless captions left out, and images left with none dropped;
    both counted in a warning."""
    kept, dropped, first, emptied = [], 0, None, []
    for record, exists in pairs:
        worded = tuple(c for c in record.captions if normalize(c))
        if len(worded) != len(record.captions):
            dropped += len(record.captions) - len(worded)
            first = first or f"{next(c for c in record.captions if not normalize(c))!r} of {record.image_path}"
            if not worded:
                emptied.append(record.image_path)
                continue
            record = replace(record, captions=worded)
        kept.append((record, exists))
    if dropped:
        log.warning("Left out %d %s captions%s with no words once normalised (first: %s), and %d images "
                    "left with no caption", dropped, dataset, named, first, len(emptied))
    return kept


def keep_existing(
    pairs: Sequence[tuple[CaptionRecord, bool]], policy: str, dataset: str, where: str | None
) -> list[CaptionRecord]:
    """Apply `data.source.missing_images` to (record, image file exists) pairs; `where` names
    the file that lists the images (None: several files, not named). Captions with no words
    once normalised are left out and counted, and images left with none (module docstring)."""
    named = f" named in {where}" if where is not None else ""
    pairs = _keep_worded(pairs, dataset, named)
    missing = [r.image_path for r, exists in pairs if not exists]
    if missing and policy == "error":
        raise ImcapError(
            f"{len(missing)} {dataset} images{named} are missing (first: {missing[0]}); "
            "add them or set data.source.missing_images=skip"
        )
    if missing:
        log.warning("Skipped %d of %d %s images%s that are missing (first: %s)",
                    len(missing), len(pairs), dataset, named, missing[0])
    return [r for r, exists in pairs if exists]


def inside_root(root: Path, name: str, where: str, follow_symlinks: bool = True) -> Path:
    """`name` resolved against `root`; an error naming `where` if that leaves `root` (an absolute
    path elsewhere, `..`). With `follow_symlinks` (your own data: `custom`), symlinks are
    followed and one leading out is refused too; without (the public datasets' readers, whose
    image folders are often links to a bigger disk) only the path as written is checked."""
    if "\0" in name:
        raise ImcapError(f"{where}: image {name!r} contains a NUL byte; fix the name")
    if follow_symlinks:
        real = (root / name).resolve()  # an absolute `name` replaces root
        outside = not real.is_relative_to(root.resolve())
    else:
        rel = os.path.normpath(name)
        real = root / rel
        outside = os.path.isabs(rel) or rel == ".." or rel.startswith("../")
    if outside:
        raise ImcapError(
            f"{where}: image {name!r} resolves to {real}, outside data.root={root}; "
            "move it under the root (no absolute paths elsewhere, '..' or symlinks leading out)"
        )
    return real


def fetch_command(dataset: str, root: Path, *overrides: str) -> str:
    """The command that downloads `data=dataset` into `root` (the files its source's `resources()` declares)."""
    extra = f' ARGS="{" ".join(overrides)}"' if overrides else ""
    return f"make data dataset={dataset} root={root}{extra}"


def missing_root(root: Path, title: str, fetch: str) -> ImcapError:
    """The one-line error for a data root that does not exist; `fetch`: how to fill it."""
    return ImcapError(f"data.root={root} does not exist: fetch {title} there with `{fetch}`, "
                      "or set data.root=DIR to where your copy is")
