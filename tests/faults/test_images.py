"""Untrusted images and image lists: decompression bombs (by their header: nothing large is
allocated here), phone photos (108 MP ones decoded reduced), pixel modes and damaged files read
as viewers show them, and records naming files outside the data root."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

from imcap.data.images import decode_image, load_image, load_image_tensor
from imcap.data.sources.coco import CocoSource
from imcap.data.sources.flickr8k import Flickr8kSource
from imcap.data.sources.flickr30k import Flickr30kSource
from imcap.errors import ImcapError
from tests.helpers.images import every_loader

HUGE = 60_000  # 3.6 G pixels: 10.8 GB as RGB, 20x PIL's default MAX_IMAGE_PIXELS


def huge_png(path):
    """A PNG whose header (IHDR, with its CRC) claims HUGE x HUGE, with one tiny data chunk."""
    return header_only_png(path, HUGE, HUGE)


@pytest.mark.parametrize("load", [load_image_tensor, load_image])
def test_a_huge_image_is_one_line_naming_the_file_before_any_decoding(tmp_path, load):
    path = huge_png(tmp_path / "huge.png")
    with pytest.raises(ImcapError, match=rf"image {path} is too large to decode safely \(.*\); shrink it") as e:
        load(path)
    assert "\n" not in str(e.value)


def header_only_png(path, width, height):
    """A PNG whose header claims width x height, with one tiny data chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize("load", [load_image_tensor, load_image])
@pytest.mark.parametrize("suffix", ["png", "webp"])
def test_the_pixel_limit_is_pil_s_limit_itself_not_twice_it(tmp_path, monkeypatch, load, suffix):
    """Between 1x and 2x MAX_IMAGE_PIXELS PIL only warns and decodes; imcap refuses from the header
    (a JPEG is decoded reduced instead: below)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / f"big.{suffix}"
    Image.new("RGB", (40, 40), "red").save(path)  # 1600 pixels: 1.6x the limit
    with pytest.raises(ImcapError, match=rf"image {path} is too large to decode safely") as e:
        load(str(path))
    assert "\n" not in str(e.value)
    for tensor in (True, False):
        with pytest.raises(ImcapError, match="too large to decode safely"):
            decode_image(path.read_bytes(), "the image of key 1 in a.tar", tensor, fix="rewrite it")
    Image.new("RGB", (25, 40), "red").save(path)  # exactly the limit: allowed
    assert load(str(path)) is not None


def test_a_shard_member_between_1x_and_2x_the_limit_is_counted_as_too_large_when_indexed(monkeypatch):
    from imcap.data.shards import _image_problem

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, "PNG")  # 1.6x the limit
    assert _image_problem(buf.getvalue()) == "image too large"


def test_the_limit_holds_while_another_thread_restores_the_warning_filters(tmp_path, monkeypatch):
    """`warnings.catch_warnings` is process-wide: the header is checked again after the open."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(path)
    real = warnings.simplefilter
    monkeypatch.setattr(warnings, "simplefilter", lambda action, *a, **k: real("ignore", *a, **k))
    with pytest.raises(ImcapError, match="too large to decode safely"):
        load_image(str(path))


def test_a_header_of_1_1_times_pil_s_default_limit_is_refused_before_decoding(tmp_path):
    path = header_only_png(tmp_path / "big.png", 10_000, 10_000)  # 1e8 pixels, PIL's limit is 8.9e7
    with pytest.raises(ImcapError, match="too large to decode safely"):
        load_image(path)


# -- JPEGs over the limit (108 and 200 MP phone photos): decoded reduced by libjpeg ----------------
def noise_jpeg(path, width, height, **kwargs):
    Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        path, quality=90, **kwargs)
    return str(path)


def test_a_jpeg_over_the_limit_is_decoded_reduced_and_one_within_it_as_before(tmp_path, monkeypatch):
    expected = {}
    for (width, height), scale in {(40, 40): 2, (100, 90): 4, (250, 120): 8, (25, 40): 1}.items():
        path = noise_jpeg(tmp_path / f"{width}.jpg", width, height)
        with Image.open(path) as im:  # what libjpeg decodes at that scale (25 x 40, the limit: whole)
            if scale > 1:
                im.draft("RGB", (width // scale, height // scale))
            expected[path] = T.PILToTensor()(im.convert("RGB"))
        assert tuple(expected[path].shape) == (3, -(-height // scale), -(-width // scale))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for path, pixels in expected.items():
        assert all(torch.equal(got, pixels) for got in every_loader(path)), path


def test_a_sideways_phone_photo_over_the_limit_is_upright_after_reduced_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = sideways_jpeg(tmp_path / "phone.jpg", 6)  # 60 x 40 stored: 2400 pixels, 600 at 1/2
    for pixels in every_loader(path):
        assert tuple(pixels.shape) == (3, 30, 20)
        top, bottom = pixels[:, :12].float().mean((1, 2)), pixels[:, 18:].float().mean((1, 2))
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)


def test_a_jpeg_decoded_reduced_prints_no_decompression_bomb_warning(tmp_path, monkeypatch):
    """Not even when another thread has just restored the warning filters without ours
    (`catch_warnings` is process-wide; features are decoded by a pool of threads): PIL's warning
    is for an image refused, and this one is read."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = noise_jpeg(tmp_path / "phone.jpg", 40, 40)  # 1600 pixels: decoded at 1/2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "simplefilter", lambda *args, **kwargs: None)  # the other thread's restore
        pixels = every_loader(path)
    assert [tuple(p.shape) for p in pixels] == [(3, 20, 20)] * 4
    assert [str(w.message) for w in caught if w.category is Image.DecompressionBombWarning] == []


@pytest.mark.parametrize("load", [load_image_tensor, load_image])
def test_a_jpeg_over_the_limit_at_1_8_or_progressive_is_still_refused(tmp_path, monkeypatch, load):
    """At 1/8 libjpeg still decodes too many pixels; a progressive file holds all its coefficients
    whatever the scale."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    bomb = noise_jpeg(tmp_path / "bomb.jpg", 400, 300)  # 50 x 38 = 1900 pixels at 1/8
    with pytest.raises(ImcapError, match=rf"image {bomb} is too large to decode safely \(.*, even decoded at "
                                         r"1/8 scale\); shrink it"):
        load(bomb)
    progressive = noise_jpeg(tmp_path / "progressive.jpg", 40, 40, progressive=True)
    with pytest.raises(ImcapError, match=rf"image {progressive} is too large to decode safely \(.*; a progressive "
                                         r"JPEG cannot be decoded reduced\)"):
        load(progressive)


def phone_photo_108_mp(path) -> str:
    """A 12000 x 9000 baseline JPEG as a phone's 108 MP mode writes (its pixels cheap to make)."""
    im = Image.new("RGB", (12000, 9000), (70, 130, 200))
    im.paste((240, 200, 40), (0, 6000, 12000, 9000))
    im.save(path, quality=30)
    return str(path)


@pytest.mark.slow
def test_a_108_mp_phone_photo_is_captioned_by_imcap_caption_decoded_at_half_size(trained_run, tmp_path):
    from tests.helpers.runs import module

    photo = phone_photo_108_mp(tmp_path / "IMG_108MP.jpg")
    with pytest.warns(Image.DecompressionBombWarning, match="108000000 pixels"), Image.open(photo) as im:
        assert im.size == (12000, 9000)  # over PIL's limit of 89478485 pixels: PIL itself warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(photo).size == (6000, 4500)  # the memory of a 27 MP image, not of 108 MP
    assert [w for w in caught if w.category is Image.DecompressionBombWarning] == []  # imcap reads it silently
    result = module("caption", f"ckpt_path={trained_run}/checkpoints/best.ckpt", f"images=[{photo}]",
                    f"output={tmp_path}/captions.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "captioned 1, skipped 0" in result.stderr and "DecompressionBombWarning" not in result.stderr
    [entry] = json.loads((tmp_path / "captions.json").read_text())
    assert entry["image"] == photo and entry["caption"]


def test_an_image_under_the_limit_still_decodes_on_the_fast_path(tmp_path):
    path = tmp_path / "ok.jpg"
    Image.new("RGB", (40, 30), "blue").save(path)
    assert tuple(load_image_tensor(str(path)).shape) == (3, 30, 40)


# -- phone photos: EXIF orientation ------------------------------------------------------------
def two_halves(width=40, height=60):
    """An upright picture: red top half, blue bottom half."""
    im = Image.new("RGB", (width, height), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, width, height // 2))
    return im


def sideways_jpeg(path, orientation=6):
    """`two_halves` stored as a phone stores a portrait photo: pixels turned, the turn in EXIF."""
    turn = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    two_halves().transpose(turn).save(path, exif=exif, quality=95)
    return str(path)


def assert_upright(pixels: torch.Tensor):
    """(3, H, W) uint8: portrait, red on top, blue below."""
    assert tuple(pixels.shape) == (3, 60, 40)
    top, bottom = pixels[:, :25].float().mean((1, 2)), pixels[:, 35:].float().mean((1, 2))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50, (top, bottom)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_phone_photo_is_read_upright_by_every_loader(tmp_path, orientation):
    path = sideways_jpeg(tmp_path / "phone.jpg", orientation)
    data = open(path, "rb").read()
    assert_upright(load_image_tensor(path))
    assert_upright(T.PILToTensor()(load_image(path)))
    assert_upright(decode_image(data, "the image of key 1 in a.tar", True, fix="rewrite it"))
    assert_upright(T.PILToTensor()(decode_image(data, "the image of key 1 in a.tar", False, fix="rewrite it")))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_torchvision_s_jpeg_path_turns_each_orientation_as_pil_does(tmp_path, orientation):
    """Equal pixels to `ImageOps.exif_transpose`, for all eight EXIF orientations."""
    path = tmp_path / "o.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    noise = np.random.default_rng(orientation).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, exif=exif)
    with Image.open(path) as im:
        expected = T.PILToTensor()(ImageOps.exif_transpose(im).convert("RGB"))
    assert torch.equal(load_image_tensor(str(path)), expected)
    assert torch.equal(T.PILToTensor()(load_image(str(path))), expected)


def test_a_png_with_an_orientation_tag_is_turned_too(tmp_path):
    path = tmp_path / "phone.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    two_halves().transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    assert_upright(load_image_tensor(str(path)))


# -- pixel modes as a viewer shows them ---------------------------------------------------------
def saved(path, image, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def palette(transparent: bool):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 0, 128, 0])  # index 0 black, 1 green
    im.paste(0, (0, 0, 2, 4))  # left half: index 0
    return im


MODES = {
    # name: (make(path) -> file, expected RGB of the pixel at (0, 0), tolerance)
    "16-bit grey PNG at mid-grey": (lambda p: saved(p / "g.png", Image.fromarray(np.full((4, 4), 32896, np.uint16))),
                                    (128, 128, 128), 0),
    "32-bit int grey": (lambda p: saved(p / "i.png", Image.new("I", (4, 4), 65535)), (255, 255, 255), 0),
    "float grey TIFF": (lambda p: saved(p / "f.tif", Image.fromarray(np.full((4, 4), 0.25, np.float32))),
                        (64, 64, 64), 0),
    "transparent RGBA": (lambda p: saved(p / "t.png", Image.new("RGBA", (4, 4), (0, 0, 0, 0))), (255, 255, 255), 0),
    "half-transparent red": (lambda p: saved(p / "h.png", Image.new("RGBA", (4, 4), (255, 0, 0, 128))),
                             (255, 127, 127), 1),
    "transparent LA": (lambda p: saved(p / "la.png", Image.new("LA", (4, 4), (0, 0))), (255, 255, 255), 0),
    "palette PNG with a transparent index": (lambda p: saved(p / "pt.png", palette(True), transparency=0),
                                             (255, 255, 255), 0),
    "palette GIF with a transparent index": (lambda p: saved(p / "pt.gif", palette(True), transparency=0),
                                             (255, 255, 255), 0),
    "palette PNG, opaque": (lambda p: saved(p / "p.png", palette(False)), (0, 0, 0), 0),
    "CMYK JPEG (Adobe, inverted)": (lambda p: saved(p / "c.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0))),
                                    (255, 0, 0), 3),
    "CMYK TIFF": (lambda p: saved(p / "c.tif", Image.new("CMYK", (8, 8), (255, 0, 255, 0))), (0, 255, 0), 0),
    "1-bit": (lambda p: saved(p / "b.png", Image.new("1", (4, 4), 1)), (255, 255, 255), 0),
    "grey with a transparent value": (lambda p: saved(p / "lt.png", Image.new("L", (4, 4), 7), transparency=7),
                                      (255, 255, 255), 0),
}


@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("load", [load_image_tensor, load_image])
def test_pixel_modes_become_what_a_viewer_shows_with_transparency_on_white(tmp_path, name, load):
    make, expected, tolerance = MODES[name]
    path = make(tmp_path)
    pixels = load(path)
    pixels = pixels if isinstance(pixels, torch.Tensor) else T.PILToTensor()(pixels)
    assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3
    got = pixels[:, 0, 0].tolist()
    assert all(abs(g - e) <= tolerance for g, e in zip(got, expected)), (name, got, expected)


def test_a_16_bit_gradient_keeps_its_steps(tmp_path):
    """Not clipped to white above 255: the 16-bit scale maps onto the 8-bit one."""
    ramp = np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (2, 1))  # 0, 257, ... 65535: 256 steps
    path = saved(tmp_path / "ramp.png", Image.fromarray(ramp))
    assert load_image_tensor(path)[0, 0].tolist() == list(range(256))


# -- damaged files: one line naming the file ------------------------------------------------------
def image_bytes(fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(buf, fmt, **kwargs)
    return buf.getvalue()


def changed(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1:]


def png_with_chunks(chunk_size=64) -> bytes:
    """A PNG whose pixel data spans many IDAT chunks, as cameras and browsers write them."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = np.random.default_rng(0).integers(0, 256, (40, 1 + 30 * 3), dtype=np.uint8)
    rows[:, 0] = 0  # filter type per row
    z = zlib.compress(rows.tobytes())
    idat = b"".join(chunk(b"IDAT", z[i:i + chunk_size]) for i in range(0, len(z), chunk_size))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30, 40, 8, 2, 0, 0, 0)) + idat
            + chunk(b"IEND", b""))


def broken_chunk_name(data: bytes) -> bytes:
    """The second IDAT chunk's name overwritten: PIL raises SyntaxError ("broken PNG file")."""
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)
    return data[:second] + b"\0\0\0\0" + data[second + 4:]


DAMAGED = {
    # name: (file name, bytes); what PIL raises for each is in the comment
    "PNG, a chunk name broken (SyntaxError)": ("a.png", lambda: broken_chunk_name(png_with_chunks())),
    "PNG, IHDR length 0 (ValueError)": ("b.png", lambda: changed(image_bytes("PNG"), 11, 0)),
    "PNG, truncated (OSError)": ("c.png", lambda: image_bytes("PNG")[:-200]),
    "GIF, truncated": ("d.gif", lambda: image_bytes("GIF")[:-300]),
    "TIFF, bad dimensions (ValueError)": ("e.tif", lambda: changed(image_bytes("TIFF"), 12, 1)),
    "TIFF, truncated": ("f.tif", lambda: image_bytes("TIFF")[:-500]),
    "JPEG, truncated": ("g.jpg", lambda: image_bytes("JPEG")[:300]),
    "JPEG, magic then garbage": ("h.jpg", lambda: b"\xff\xd8\xff" + bytes(range(256)) * 4),
    "WebP, truncated": ("i.webp", lambda: image_bytes("WEBP")[:-100]),
    "BMP, bad compression field (ValueError)": ("j.bmp", lambda: changed(image_bytes("BMP"), 30, 1)),
    "BMP, truncated": ("k.bmp", lambda: image_bytes("BMP")[:-500]),
    "PNG magic then garbage": ("l.png", lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
    "zero bytes": ("m.jpg", lambda: b""),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_a_damaged_image_of_any_format_is_one_line_naming_the_file(tmp_path, name):
    file_name, make = DAMAGED[name]
    path = tmp_path / file_name
    path.write_bytes(make())
    for load in (load_image, load_image_tensor):
        with pytest.raises(ImcapError, match=rf"cannot read image {path}: .*; replace or remove the file") as e:
            load(str(path))
        assert "\n" not in str(e.value) and "BytesIO" not in str(e.value)
    for tensor in (True, False):  # a shard member
        with pytest.raises(ImcapError, match=r"cannot decode the image of key 7 in a.tar: .*; rewrite it"):
            decode_image(path.read_bytes(), "the image of key 7 in a.tar", tensor, fix="rewrite it")


def test_a_folder_a_symlink_loop_and_an_empty_file_are_named_as_what_they_are(tmp_path):
    """Not "(a damaged or truncated file)" nor "cannot identify image file"."""
    (tmp_path / "album.jpg").mkdir()
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    reasons = {"album.jpg": "a folder, not an image", "loop.jpg": "a symlink loop", "empty.jpg": "an empty file (0 bytes)"}
    for name, reason in reasons.items():
        path = str(tmp_path / name)
        for load in (load_image, load_image_tensor):
            with pytest.raises(ImcapError) as e:
                load(path)
            assert str(e.value) == f"cannot read image {path}: {reason}; replace or remove the file"
    with pytest.raises(ImcapError, match=r"^cannot decode the image of key 7 in a.tar: an empty file \(0 bytes\); "):
        decode_image(b"", "the image of key 7 in a.tar", False, fix="rewrite it")


@pytest.mark.slow
def test_a_damaged_png_in_a_dataset_is_one_error_line_from_imcap_data_features(tmp_path):
    """Through the CLI, in a new process: PIL's SyntaxError was a traceback."""
    from tests.helpers.runs import assert_one_line_error, module

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(root / f"{i}.jpg")
    (root / "broken.png").write_bytes(broken_chunk_name(png_with_chunks()))
    rows = "".join(f"{i}.jpg,a red square,train\n" for i in range(4)) + "broken.png,a broken picture,train\n"
    (root / "captions.csv").write_text("image,caption,split\n" + rows, encoding="utf-8")
    result = module("data", "features", "data=custom", f"data.root={root}", "model.encoder.weights=null", cwd=tmp_path)
    assert_one_line_error(result, f"error: cannot read image {root / 'broken.png'}: broken PNG file")


# -- records naming files outside the root ----------------------------------------------------
OUTSIDE = ["../outside.jpg", "/etc/hostname", "sub/../../outside.jpg"]


@pytest.fixture
def outside_image(tmp_path):
    """A real image beside (not under) the data root, which a record must not reach."""
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.jpg")
    root = tmp_path / "root"
    root.mkdir()
    return root


def coco_official(root, name):
    (root / "annotations").mkdir()
    (root / "train2014").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train2014" / "ok.jpg")
    images = [{"id": 1, "file_name": "ok.jpg"}, {"id": 2, "file_name": name}]
    annotations = [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}]
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return CocoSource(str(root)), r"captions_train2014.json: image id 2"


def coco_karpathy(root, name):
    name = name if name.startswith("/") else f"../{name}"  # below filepath val2014/
    items = [{"filepath": "val2014", "filename": name, "split": "test", "cocoid": 7, "sentences": [{"raw": "a"}]}]
    (root / "dataset_coco.json").write_text(json.dumps({"images": items}))
    return CocoSource(str(root)), r"dataset_coco.json: image entry 0"


def flickr_tokens(root, name):
    (root / "Flicker8k_Dataset").mkdir()
    (root / "Flickr8k.token.txt").write_text(f"{name}#0\ta dog\n", encoding="utf-8")
    return Flickr8kSource(str(root)), r"Flickr8k.token.txt:1"


def flickr_kaggle(root, name):
    (root / "Images").mkdir()
    (root / "captions.txt").write_text(f"image,caption\n{name},a dog\n", encoding="utf-8")
    return Flickr8kSource(str(root)), r"captions.txt:2"


def flickr_karpathy(root, name):
    items = [{"filename": name, "split": "train", "imgid": 0, "sentences": [{"raw": "a dog"}]}]
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": items}))
    return Flickr8kSource(str(root)), r"dataset_flickr8k.json: image entry 0"


def flickr30k_kaggle(root, name):
    (root / "flickr30k_images").mkdir()
    (root / "results.csv").write_text(f"image_name| comment_number| comment\n{name}| 0| a dog\n", encoding="utf-8")
    return Flickr30kSource(str(root)), r"results.csv:2"


@pytest.mark.parametrize("name", OUTSIDE)
@pytest.mark.parametrize("layout", [coco_official, coco_karpathy, flickr_tokens, flickr_kaggle, flickr_karpathy,
                                    flickr30k_kaggle])
def test_records_naming_files_outside_the_root_are_refused(outside_image, layout, name):
    source, where = layout(outside_image, name)
    with pytest.raises(ImcapError, match=rf"{where}: image .* outside data.root") as e:
        source.records()
    assert "\n" not in str(e.value)


def test_an_image_folder_that_is_a_symlink_to_another_disk_still_works(tmp_path):
    """Only the names as written are checked for the public datasets: their image folders are
    often links to a bigger disk."""
    disk, root = tmp_path / "disk", tmp_path / "coco"
    disk.mkdir()
    root.mkdir()
    os.symlink(disk, root / "val2014")
    Image.new("RGB", (8, 8)).save(disk / "a.jpg")
    items = [{"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 7, "sentences": [{"raw": "a"}]}]
    (root / "dataset_coco.json").write_text(json.dumps({"images": items}))
    [record] = CocoSource(str(root)).records()
    assert record.image_path == str(root / "val2014" / "a.jpg")


def test_a_pil_image_handed_to_the_captioner_is_read_as_a_viewer_shows_it(trained_run):
    """The demo hands Gradio's upload over in the file's own mode: a transparent or sideways
    image is captioned as the white or upright picture it shows."""
    from imcap.models.captioner import Captioner

    captioner = Captioner.from_checkpoint(trained_run / "checkpoints" / "best.ckpt")
    picture = two_halves()
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = picture.transpose(Image.Transpose.ROTATE_90)
    clear = Image.new("RGBA", (40, 60), (0, 0, 0, 0))
    white = Image.new("RGB", (40, 60), "white")
    [upright, turned, on_clear, on_white] = captioner.caption([picture, Image.open(io.BytesIO(
        saved_bytes(sideways, exif))), clear, white])
    assert turned.words == upright.words and torch.equal(turned.attention, upright.attention)
    assert on_clear.words == on_white.words and torch.equal(on_clear.attention, on_white.attention)


def test_a_damaged_file_opened_with_pil_and_handed_to_the_captioner_is_one_line_naming_it(trained_run, tmp_path):
    from imcap.models.captioner import Captioner

    path = tmp_path / "cut.jpg"
    data = image_bytes("JPEG")
    path.write_bytes(data[: len(data) * 2 // 3])  # the header whole: Image.open succeeds, the pixels fail
    captioner = Captioner.from_checkpoint(trained_run / "checkpoints" / "best.ckpt")
    with pytest.raises(ImcapError, match=rf"^cannot read image {path}: .*truncated.*; replace or remove the file$"):
        captioner.caption([Image.open(path)])


def saved_bytes(image, exif) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", exif=exif)
    return buf.getvalue()
