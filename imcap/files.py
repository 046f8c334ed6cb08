"""Atomic file writes: a reader (or a later run) sees the old file or the new one, never half.

Every output a run leaves (metrics.json, predictions/*.json, vocab.json, checkpoints) is written
to a temporary file beside the target and moved over it with `os.replace`, which is atomic
within one filesystem. A process killed mid-write leaves at most `<name>.tmp`, which the next
write of the same file overwrites.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on `<path>.tmp`, flush it to disk, then move it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # same directory: os.replace stays on one filesystem
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write JSON (UTF-8, non-ASCII kept) atomically."""
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
