"""What readers do with data they cannot use as is: stop with a clear error, or skip and report;
and what they say when the data is not there at all."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from imcap.data.records import CaptionRecord
from imcap.errors import ImcapError

log = logging.getLogger(__name__)

MISSING_IMAGES = ("error", "skip")


def check_choice(value: str, choices: Sequence[str], option: str) -> str:
    """`value` if it is one of `choices`, else a one-line error naming the option."""
    if value not in choices:
        raise ImcapError(f"{option}={value!r}; use {' or '.join(repr(c) for c in choices)}")
    return value


def keep_existing(
    pairs: Sequence[tuple[CaptionRecord, bool]], policy: str, dataset: str, where: str | None
) -> list[CaptionRecord]:
    """Apply `data.source.missing_images` to (record, image file exists) pairs; `where` names
    the file that lists the images (None: several files, not named)."""
    missing = [r.image_path for r, exists in pairs if not exists]
    named = f" named in {where}" if where is not None else ""
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
    """The command that downloads `data=dataset` into `root` (imcap/data/download.py's recipes)."""
    extra = f' ARGS="{" ".join(overrides)}"' if overrides else ""
    return f"make data dataset={dataset} root={root}{extra}"


def missing_root(root: Path, title: str, fetch: str) -> ImcapError:
    """The one-line error for a data root that does not exist; `fetch`: how to fill it."""
    return ImcapError(f"data.root={root} does not exist: fetch {title} there with `{fetch}`, "
                      "or set data.root=DIR to where your copy is")
