"""Tiny real image files for readers and datasets."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from imcap.data.images import decode_image, load_image, load_image_tensor


def write_image(path: Path, color: tuple[int, int, int] = (0, 0, 0), size: int = 8) -> Path:
    """A `size` x `size` image in the format its suffix names, folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def jpeg_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG")
    return buf.getvalue()


def every_loader(path) -> list[torch.Tensor]:
    """(3, H, W) uint8 pixels of `path` through each way imcap reads an image file or shard member."""
    data = open(path, "rb").read()
    return [load_image_tensor(path), T.PILToTensor()(load_image(path)),
            decode_image(data, "the image of key 1 in a.tar", True, fix="rewrite it"),
            T.PILToTensor()(decode_image(data, "the image of key 1 in a.tar", False, fix="rewrite it"))]
