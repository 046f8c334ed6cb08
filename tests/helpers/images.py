"""Tiny real image files for readers and datasets."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


def write_image(path: Path, color: tuple[int, int, int] = (0, 0, 0), size: int = 8) -> Path:
    """A `size` x `size` image in the format its suffix names, folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def jpeg_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG")
    return buf.getvalue()
