"""iPhone photos: HEIC/HEIF files read like any other photo where pi-heif (the heif extra) is installed (their
turn, kept in the container, applied once), and one line saying how to get it where it is not."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from imcap.data import images
from imcap.data.images import decode_image, load_image, load_image_tensor
from imcap.errors import ImcapError
from tests.helpers.images import every_loader

pillow_heif = pytest.importorskip("pillow_heif")


def upright_picture(width=48, height=64) -> Image.Image:
    """A portrait picture whose every pixel differs from its turned or mirrored copies."""
    return Image.fromarray(np.random.default_rng(6).integers(0, 256, (height, width, 3), dtype=np.uint8))


# `picture` (PNG on stdin) saved as an iPhone saves a portrait photo (HEIC on stdout); the turn is
# written by pillow-heif from the EXIF tag. In a process of its own: the opener that reads it
# back must be the one imcap registers.
TO_PHONE_HEIC = """
import sys, io
from PIL import Image
from pillow_heif import register_heif_opener
register_heif_opener()
exif = Image.Exif()
exif[0x0112] = 6
out = io.BytesIO()
Image.open(io.BytesIO(sys.stdin.buffer.read())).transpose(Image.Transpose.ROTATE_90).save(
    out, "HEIF", exif=exif.tobytes(), quality=-1, chroma=444, matrix_coefficients=0)
sys.stdout.buffer.write(out.getvalue())
"""


def phone_heic(path, picture: Image.Image) -> str:
    """`picture` as an iPhone saves a portrait photo: the pixels stored sideways, the turn in the
    container (irot) and the EXIF Orientation tag 6 kept beside it. Lossless (RGB stored as is),
    so the decoded pixels can be compared exactly."""
    png = io.BytesIO()
    picture.save(png, "PNG")
    heic = subprocess.run([sys.executable, "-c", TO_PHONE_HEIC], input=png.getvalue(), capture_output=True,
                          check=True).stdout
    path.write_bytes(heic)
    return str(path)


def test_a_sideways_iphone_photo_is_read_upright_and_turned_once_by_every_loader(tmp_path):
    picture = upright_picture()
    path = phone_heic(tmp_path / "IMG_0001.HEIC", picture)
    data = open(path, "rb").read()
    assert data[4:8] == b"ftyp" and b"irot" in data  # the turn is in the container
    exif = Image.Exif()
    exif.load(pillow_heif.open_heif(path).info["exif"])
    assert exif[0x0112] == 6  # and the EXIF tag inside says to turn it too
    expected = T.PILToTensor()(picture)
    for pixels in every_loader(path):
        assert torch.equal(pixels, expected)  # not sideways (no turn) nor upside down (two turns)


def test_a_damaged_heic_is_one_line_naming_the_file_with_libheif_s_reason(tmp_path):
    data = open(phone_heic(tmp_path / "whole.heic", upright_picture()), "rb").read()
    path = tmp_path / "IMG_0002.HEIC"
    path.write_bytes(data[: len(data) * 2 // 3])  # a copy stopped part-way
    for load in (load_image, load_image_tensor):
        with pytest.raises(ImcapError, match=rf"^cannot read image {path}: .*outside of file bounds.* \(a damaged "
                                             r"or truncated file\); replace or remove the file$"):
            load(str(path))


def test_a_heic_without_pillow_heif_is_one_line_saying_how_to_get_it(tmp_path, monkeypatch):
    path = phone_heic(tmp_path / "IMG_0003.HEIC", upright_picture())
    monkeypatch.setattr(images, "HeifImageFile", None, raising=False)  # as where `import pillow_heif` fails
    for load in (load_image, load_image_tensor):
        with pytest.raises(ImcapError) as e:
            load(path)
        assert str(e.value) == (f"cannot read image {path}: a HEIC/HEIF photo, and no HEIF reader (pi-heif) is "
                                "installed; pip install 'imcap[heif]' to read it (in a clone of imcap: make install)")
    with pytest.raises(ImcapError, match=r"^cannot decode the image of key 7 in a.tar: a HEIC/HEIF photo, and "):
        decode_image(open(path, "rb").read(), "the image of key 7 in a.tar", True, fix="rewrite it")


def test_a_heic_over_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    path = phone_heic(tmp_path / "big.heic", upright_picture())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 48 x 64 = 3072 pixels
    with pytest.raises(ImcapError, match=rf"^image {path} is too large to decode safely"):
        load_image(path)


@pytest.mark.slow
def test_imcap_caption_captions_an_iphone_photo_as_the_same_picture_upright(trained_run, data_dir, tmp_path):
    """In a new process, a folder as a phone's camera roll is copied: the HEIC gets the caption of
    the same picture saved upright as PNG."""
    from tests.helpers.runs import module

    picture = Image.open(sorted(data_dir.rglob("test_*.png"))[0]).convert("RGB")  # one the model knows
    photos = tmp_path / "photos"
    photos.mkdir()
    picture.save(photos / "upright.png")
    phone_heic(photos / "IMG_0004.HEIC", picture)
    result = module("caption", f"ckpt_path={trained_run}/checkpoints/best.ckpt", f"images=[{photos}]",
                    f"output={tmp_path}/captions.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "captioned 2, skipped 0" in result.stderr
    captions = {entry["image"].rsplit("/", 1)[1]: entry["caption"]
                for entry in json.loads((tmp_path / "captions.json").read_text())}
    assert captions["IMG_0004.HEIC"] == captions["upright.png"], captions


def test_a_heic_opened_with_pil_and_handed_to_imcap_is_read_upright(tmp_path):
    """As a script hands `Captioner.caption` the PIL images it opened (`as_viewed`)."""
    picture = upright_picture()
    data = open(phone_heic(tmp_path / "a.heic", picture), "rb").read()
    assert torch.equal(T.PILToTensor()(images.as_viewed(Image.open(io.BytesIO(data)))), T.PILToTensor()(picture))


def test_the_demo_reads_an_uploaded_iphone_photo_upright(tmp_path):
    from imcap.demo import Demo

    picture = upright_picture()
    upload = phone_heic(tmp_path / "IMG_0005.HEIC", picture)  # Gradio keeps the upload's own name
    assert torch.equal(T.PILToTensor()(Demo.read(upload)), T.PILToTensor()(picture))


def test_a_folder_of_iphone_photos_with_sidecars_is_a_dataset_read_upright(tmp_path):
    """data=custom's folder layout: each HEIC is a record with its .txt caption, not an orphan sidecar."""
    from imcap.data.sources.custom import CustomSource

    picture = upright_picture()
    phone_heic(tmp_path / "IMG_0006.HEIC", picture)
    (tmp_path / "IMG_0006.txt").write_text("a photo taken upright\n", encoding="utf-8")
    [record] = CustomSource(str(tmp_path)).records()
    assert record.image_id == "IMG_0006.HEIC" and record.captions == ("a photo taken upright",)
    assert torch.equal(load_image_tensor(record.image_path), T.PILToTensor()(picture))


def test_imcap_reads_heif_with_the_decoder_only_package_where_it_is_installed():
    """The heif extra's pi-heif (LGPL-3.0 wheels) reads, not pillow-heif (GPL-2.0 wheels, with an
    encoder), which only the tests use to write HEIC files."""
    pytest.importorskip("pi_heif")
    assert images.HeifImageFile.__module__.split(".")[0] == "pi_heif"
