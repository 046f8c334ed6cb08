"""sha256 of files: how downloads, provisioned weights and packaged weights are verified."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20  # read 1 MiB at a time: multi-GB archives never sit in memory


def sha256_of(path: Path) -> hashlib._Hash:
    """The running sha256 of a file's bytes; more bytes can be added (a resumed download)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file."""
    return sha256_of(path).hexdigest()
