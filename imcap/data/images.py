"""Image files to the pixels an image viewer shows, and the per-encoder image transform.

Every reader of images (training, the feature cache, eval, `imcap.caption`, the demo, shards)
goes through `load_image`, `load_image_tensor`, `decode_image` or `as_viewed`, so all of them see:

- the EXIF orientation applied: phones store a portrait photo sideways with an orientation tag,
  and viewers (and Gradio, for the demo's uploads) turn it upright;
- HEIC/HEIF (iPhone photos) read where pi-heif (or pillow-heif) is installed (`pip install 'imcap[heif]'`;
  without it, one line saying so). A HEIF file keeps its turn in the container (irot/imir),
  which libheif applies while decoding; pi-heif then sets the EXIF tag inside to 1, so the
  photo is not turned twice;
- the pixel mode converted as a viewer shows it: 16-bit greyscale (`I;16`, `I`) scaled to 8 bits
  (65535 is white; `convert("RGB")` clips every value over 255 to white), 32-bit float (`F`) read
  as 0..1, palette (`P`), 1-bit and CMYK images through PIL's conversions (PIL's JPEG reader has
  already un-inverted Adobe's inverted CMYK);
- transparency (`RGBA`, `LA`, `PA`, palette or colour-key transparency) composited on WHITE,
  the page behind an image in a browser or viewer; `convert("RGB")` keeps whatever colour lies
  under the transparent pixels, usually black, which turns a logo into a dark square;
- a refusal of any image over `PIL.Image.MAX_IMAGE_PIXELS`, from the header before any pixel is
  decoded (PIL itself only warns up to twice that number), except a baseline JPEG (what phones
  write, 108 and 200 MP modes included), which libjpeg decodes reduced instead (1/2, 1/4 or 1/8,
  the largest that fits the limit): its memory is that of the reduced image, and the encoder
  resizes every photo to a few hundred pixels anyway. A progressive JPEG over the limit is
  still refused: libjpeg holds all of its coefficients, full size, at any scale (peak memory of
  a process decoding a 12000 x 9000 file: 430 MB whole, baseline 120 MB at 1/2 and 24 MB at
  1/8, progressive 333 MB at 1/8);
- every damaged or unreadable file as one `ImcapError` line naming it, with the true reason (an
  empty file, a folder, a symlink loop, or damage: PIL raises OSError, SyntaxError (a broken
  PNG chunk), ValueError, EOFError, IndexError or struct.error for them).

Only the first frame of an animated or multi-page file is read, as thumbnails show it.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2 as T

from imcap.errors import ImcapError

try:  # the HEIF opener, registered once per process (10 ms of import, under load 3 on 2 cores):
    # pi-heif, libheif's decoder alone (LGPL-3.0 wheels), what the heif extra installs
    from pi_heif import HeifImageFile, register_heif_opener
except ImportError:
    try:  # pillow-heif, the same reader with an encoder (GPL-2.0 wheels: x265), where that is installed
        from pillow_heif import HeifImageFile, register_heif_opener
    except ImportError:
        HeifImageFile = register_heif_opener = None
if register_heif_opener is not None:
    register_heif_opener()  # also for `Image.open` in a script that hands Captioner.caption its images
HEIF_READABLE = HeifImageFile is not None

JPEG_MAGIC = b"\xff\xd8\xff"
# The ISO base media brands of HEIF images with HEVC pixels (what iPhones write): a file that
# starts with one of these is a HEIC/HEIF photo whatever its name. The generic mif1/msf1, which
# AVIF files may carry too, are left to Image.open, which picks among its plugins.
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")
# (`pip install 'imcap[heif]'` is a no-op for an imcap installed before the extra: a clone says make install)
NEEDS_HEIF_READER = ("a HEIC/HEIF photo, and no HEIF reader (pi-heif) is installed; pip install 'imcap[heif]' to "
                     "read it (in a clone of imcap: make install)")
# How a file becomes pixels; part of every feature-cache key, so that a cache holding pixels read
# another way is never reused. Change it whenever the pixels of some file change.
PIXELS_VERSION = "viewer-2"

# What PIL raises for a damaged file, at open or while decoding (each seen fuzzing PNG, GIF, TIFF,
# JPEG, WebP and BMP files). Only PIL's own calls on the file's bytes run under this net.
DAMAGED = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
JPEG_SCALES = (2, 4, 8)  # the reductions libjpeg's DCT scaling decodes to (1/2, 1/4, 1/8)


@contextmanager
def _read_errors(name: str, verb: str = "read", fix: str = "replace or remove the file") -> Iterator[None]:
    """Turn what opening or decoding an image can raise into one line naming it (`name`: "image
    photos/a.jpg"): missing, over PIL's pixel limit, or damaged."""
    try:
        with pixel_limit():
            yield
    except FileNotFoundError as e:
        raise ImcapError(f"image not found: {e.filename}") from e
    except _HeifUnreadable as e:
        raise ImcapError(f"cannot {verb} {name}: {NEEDS_HEIF_READER}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImcapError(f"{name} is too large to decode safely ({e}); shrink it or remove it") from e
    except IsADirectoryError as e:
        raise ImcapError(f"cannot {verb} {name}: a folder, not an image; {fix}") from e
    except UnidentifiedImageError as e:
        reason = "not an image file PIL can read" if "BytesIO" in str(e) else str(e)  # no object reprs
        raise ImcapError(f"cannot {verb} {name}: {reason}; {fix}") from e
    except DAMAGED as e:
        if isinstance(e, OSError) and e.errno == errno.ELOOP:  # links leading back to themselves
            raise ImcapError(f"cannot {verb} {name}: a symlink loop; {fix}") from e
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ImcapError(f"cannot {verb} {name}: {reason} (a damaged or truncated file); {fix}") from e


class _HeifUnreadable(UnidentifiedImageError):
    """A HEIF file where no HEIF reader is installed."""


def is_heif(head: bytes) -> bool:
    """Whether `head`, a file's first 12 bytes or more, starts a HEIC/HEIF image."""
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


@contextmanager
def pixel_limit() -> Iterator[None]:
    """PIL's warning between 1x and 2x `Image.MAX_IMAGE_PIXELS` raised as an exception, so that
    `Image.open` stops there as it does over 2x."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def check_pixels(im: Image.Image) -> None:
    """The pixel limit again, on the opened header: `catch_warnings` is process-wide state, and
    another thread leaving its own block may have just restored the filters without ours."""
    over = _over_limit(im)
    if over:
        raise Image.DecompressionBombError(over)


def _over_limit(im: Image.Image) -> str | None:
    """PIL's words for an `im` over its pixel limit, None within it."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        return f"Image size ({im.width * im.height} pixels) exceeds limit of {limit} pixels"
    return None


def _scale_within_limit(width: int, height: int) -> int | None:
    """The smallest of JPEG_SCALES at which a width x height JPEG decodes within PIL's pixel
    limit (libjpeg rounds the reduced sides up), None where even 1/8 is over it."""
    limit = Image.MAX_IMAGE_PIXELS
    return next((s for s in JPEG_SCALES if -(-width // s) * -(-height // s) <= limit), None)


def _open_jpeg(source: str | IO[bytes]) -> Image.Image:
    """The JPEG in `source` opened by PIL's JPEG plugin without `Image.open`, whose pixel check
    warns between 1x and 2x the limit: a warning that prints whenever another thread has just
    restored the warning filters, although the file is then decoded reduced. Checked here:
    over the limit, opened to decode at the largest of 1/2, 1/4, 1/8 that fits (module
    docstring); refused, with the reason, if progressive or over the limit even at 1/8."""
    if not isinstance(source, str):
        source.seek(0)
    im = JpegImagePlugin.jpeg_factory(source)  # what Image.open calls for a JPEG (or an MPO)
    over = _over_limit(im)
    if over is None:
        return im
    try:
        scale = _scale_within_limit(*im.size)
        if im.info.get("progressive"):  # libjpeg holds all of its coefficients at any scale
            raise Image.DecompressionBombError(f"{over}; a progressive JPEG cannot be decoded reduced")
        if scale is None:
            raise Image.DecompressionBombError(f"{over}, even decoded at 1/8 scale")
        im.draft(im.mode, (im.width // scale, im.height // scale))  # libjpeg's DCT scaling
        check_pixels(im)  # the reduced size libjpeg will decode to
    except BaseException:
        im.close()
        raise
    return im


def open_image(source: str | IO[bytes]) -> Image.Image:
    """`Image.open(source)` within PIL's pixel limit (`Image.MAX_IMAGE_PIXELS` itself, not twice
    it): a baseline JPEG over it opened to decode reduced (module docstring), any other image
    over it refused with `Image.DecompressionBombError`."""
    head = _peek(source, 12)
    if head.startswith(JPEG_MAGIC):
        return _open_jpeg(source)
    if is_heif(head):
        im = _open_heif(source)
    else:
        with pixel_limit():
            im = Image.open(source)
    try:
        check_pixels(im)
    except BaseException:
        im.close()
        raise
    return im


def _open_heif(source: str | IO[bytes]) -> Image.Image:
    """The HEIF image in `source` opened by the HEIF plugin itself: for a damaged file it
    gives libheif's reason, where `Image.open` says only "cannot identify image file"."""
    if HeifImageFile is None:
        raise _HeifUnreadable(NEEDS_HEIF_READER)
    if not isinstance(source, str):
        source.seek(0)
    return HeifImageFile(source)


def _peek(source: str | IO[bytes], size: int) -> bytes:
    if isinstance(source, str):
        with open(source, "rb") as f:
            return f.read(size)
    source.seek(0)
    return source.read(size)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1: upright, 2-8: flipped and/or turned), 1 when there is none."""
    value = im.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def as_viewed(im: Image.Image) -> Image.Image:
    """RGB image as a viewer shows `im` (module docstring): turned upright by its EXIF
    orientation, its pixel mode converted, transparency on white. A lazily opened
    `im` (`Image.open`) is loaded here: a damaged file is one line naming it."""
    with _read_errors(f"image {im.filename}" if getattr(im, "filename", "") else "the image"):
        im.load()
    if _orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT:  # 16 bits per sample: 65535 is white
        grey = np.asarray(im).astype(np.float64)
        return Image.fromarray((np.clip(grey, 0, 65535) / 257).round().astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":  # float samples, 0 black and 1 white (as TIFF float images are written)
        grey = np.nan_to_num(np.asarray(im, dtype=np.float64))
        return Image.fromarray((np.clip(grey, 0, 1) * 255).round().astype(np.uint8), "L").convert("RGB")
    if im.mode in _ALPHA or "transparency" in im.info:
        rgba = im.convert("RGBA")
        page = Image.new("RGB", im.size, "white")
        page.paste(rgba, mask=rgba.getchannel("A"))
        return page
    return im.convert("RGB")


def _is_empty(source: str | io.BytesIO) -> bool:
    return (os.path.getsize(source) if isinstance(source, str) else source.getbuffer().nbytes) == 0


def _viewed(source: str | io.BytesIO, name: str, verb: str = "read", fix: str = "replace or remove the file") -> Image.Image:
    with _read_errors(name, verb, fix):
        if _is_empty(source):  # PIL would say "cannot identify image file"
            raise ImcapError(f"cannot {verb} {name}: an empty file (0 bytes); {fix}")
    with _read_errors(name, verb, fix), open_image(source) as im:
        im.load()
        _orientation(im)  # a damaged EXIF block is the file's fault: read it under the net
    try:
        return as_viewed(im)
    except ValueError as e:  # a mode PIL cannot convert to RGB (LAB, multi-channel TIFF, ...)
        raise ImcapError(f"cannot {verb} {name}: its pixel mode {im.mode} has no RGB conversion; "
                         f"save it as RGB first") from e


def load_image(path: str, name: str | None = None, fix: str = "replace or remove the file") -> Image.Image:
    """RGB image as a viewer shows the file (module docstring), or a one-line error naming it
    (`name`: "image photos/a.jpg" unless given; `fix`: what to do about a damaged one)."""
    return _viewed(path, name or f"image {path}", fix=fix)


# EXIF orientation -> the same turn on a (C, H, W) tensor as ImageOps.exif_transpose's on the image
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-1, -2),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2),
    6: lambda x: x.rot90(-1, (-2, -1)),
    7: lambda x: x.transpose(-1, -2).flip(-1, -2),
    8: lambda x: x.rot90(1, (-2, -1)),
}


def _jpeg_tensor(data: bytes, name: str, verb: str, fix: str) -> torch.Tensor | None:
    """(3, H, W) uint8 of a colour JPEG decoded by torchvision and turned upright, or None where
    PIL must decode it (grey, CMYK, or a file torchvision refuses). PIL reads the header first:
    its pixel limit before torchvision allocates H x W x 3 bytes (a 60000 x 60000 header asks for
    10 GB), and its reading of the orientation tag, so both paths turn a file the same way."""
    with _read_errors(name, verb, fix), JpegImagePlugin.jpeg_factory(io.BytesIO(data)) as im:  # to the first scan
        if _over_limit(im):  # not Image.open's check, which warns (`_open_jpeg`)
            return None  # PIL decodes it reduced, or refuses it
        orientation = _orientation(im)
    try:
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None  # PIL gives the one-line error, or succeeds where torchvision did not
    if image.shape[0] != 3:  # grey and CMYK go through PIL's conversions
        return None
    return _ORIENT[orientation](image).contiguous() if orientation != 1 else image


def load_image_tensor(path: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB, the pixels of `PILToTensor()(load_image(path))`: colour JPEG files
    are decoded by torchvision straight into a tensor (libjpeg-turbo, as in PIL, with the same
    pixels; faster by the conversions it saves); anything else through PIL."""
    with _read_errors(f"image {path}"), open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ImcapError(f"cannot read image {path}: an empty file (0 bytes); replace or remove the file")
    if data.startswith(JPEG_MAGIC):
        image = _jpeg_tensor(data, f"image {path}", "read", "replace or remove the file")
        if image is not None:
            return image
    return T.PILToTensor()(load_image(path))


def decode_image(data: bytes, name: str, tensor: bool, fix: str) -> torch.Tensor | Image.Image:
    """The image in `data` (named `name` in errors: "the image of key 7 in a.tar"; `fix`: what
    to do about a damaged one) as viewers show it: a (3, H, W) uint8 tensor (`tensor=True`;
    colour JPEGs decoded by torchvision) or an RGB PIL image."""
    if tensor and data.startswith(JPEG_MAGIC):
        image = _jpeg_tensor(data, name, "decode", fix)
        if image is not None:
            return image
    rgb = _viewed(io.BytesIO(data), name, "decode", fix)
    return T.PILToTensor()(rgb) if tensor else rgb


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
