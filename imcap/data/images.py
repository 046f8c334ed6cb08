"""Image loading and the per-encoder image transform."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2 as T

from imcap.errors import ImcapError

JPEG_MAGIC = b"\xff\xd8\xff"


@contextmanager
def _read_errors(path: str) -> Iterator[None]:
    """Turn what reading or decoding the image at `path` can raise into a one-line error naming
    the file: missing, over PIL's pixel limit, or unreadable."""
    try:
        yield
    except FileNotFoundError as e:
        raise ImcapError(f"image not found: {path}") from e
    except Image.DecompressionBombError as e:
        raise ImcapError(f"image {path} is too large to decode safely ({e}); shrink it or remove it") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ImcapError(f"cannot read image {path}: {e}; replace or remove the file") from e


def load_image(path: str) -> Image.Image:
    """RGB image, or a one-line error naming the file (also for one over PIL's pixel limit,
    `PIL.Image.MAX_IMAGE_PIXELS`, which PIL checks from the header before decoding)."""
    with _read_errors(path), Image.open(path) as im:
        return im.convert("RGB")


def _check_jpeg_header(path: str, data: bytes) -> None:
    """PIL's pixel limit, from the JPEG header alone (PIL stops reading at the first scan), before
    torchvision allocates H x W x 3 bytes: a 60000 x 60000 header would ask for 10 GB."""
    with _read_errors(path), Image.open(io.BytesIO(data)):
        pass


def load_image_tensor(path: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB, the pixels of `PILToTensor()(load_image(path))`: colour JPEG files
    are decoded by torchvision straight into a tensor (libjpeg-turbo, as in PIL, with the same
    pixels; faster by the conversions it saves); anything else through PIL."""
    with _read_errors(path), open(path, "rb") as f:
        data = f.read()
    if data.startswith(JPEG_MAGIC):
        _check_jpeg_header(path, data)
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
            if image.shape[0] == 3:  # YCbCr (or RGB); grey and CMYK go through PIL's conversion below
                return image
        except RuntimeError:
            pass  # PIL below gives the one-line error, or succeeds where torchvision did not
    return T.PILToTensor()(load_image(path))


def accepts_uint8_tensor(transform: Callable) -> bool:
    """Whether `transform` (from `image_transform`) gives the same result for the uint8 tensor of
    an image as for the PIL image: a v2 Compose whose first step is PILToTensor (v2 transforms
    pass tensors through the steps meant for PIL images)."""
    steps = getattr(transform, "transforms", None)
    return isinstance(transform, T.Compose) and bool(steps) and isinstance(steps[0], T.PILToTensor)


def image_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the whole image to a square (no crop: captions describe all of it), normalise
    with the encoder's own statistics. Takes a PIL image or its (3, H, W) uint8 tensor; the
    resize runs on uint8, before the conversion to float."""
    return T.Compose([
        T.PILToTensor(),
        T.Resize((image_size, image_size), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(mean), std=list(std)),
    ])
