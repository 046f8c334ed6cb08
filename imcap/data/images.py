"""Image loading and the per-encoder image transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

from imcap.errors import ImcapError


def load_image(path: str) -> Image.Image:
    """RGB image, or a one-line error naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise ImcapError(f"image not found: {path}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ImcapError(f"cannot read image {path}: {e}; replace or remove the file") from e


def image_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the whole image to a square (no crop: captions describe all of it), normalise
    with the encoder's own statistics."""
    return T.Compose([
        T.PILToTensor(),
        T.Resize((image_size, image_size), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(mean), std=list(std)),
    ])
