"""A phone photo, stored sideways with an EXIF orientation tag, is captioned as the upright
picture it shows: through `python -m imcap.caption`, in a new process, as a user runs it."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from tests.helpers.runs import run

ORIENTATION = 0x0112


def phone_and_upright(picture: Image.Image, folder, name: str):
    """The picture twice, as JPEGs: stored upright, and as a phone stores a portrait photo (pixels
    turned a quarter to the left, EXIF orientation 6: "turn right to view"). Quality 100 and no
    chroma subsampling, so both hold the same pixels, only turned."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    upright, phone = folder / f"{name}-upright.jpg", folder / f"{name}-phone.jpg"
    picture.save(upright, quality=100, subsampling=0)
    picture.transpose(Image.Transpose.ROTATE_90).save(phone, quality=100, subsampling=0, exif=exif)
    with Image.open(phone) as im:  # as a viewer finds it: sideways pixels, the turn in the tag
        assert im.size == (picture.height, picture.width) and im.getexif()[ORIENTATION] == 6
    return upright, phone


@pytest.mark.slow
def test_a_phone_photo_and_the_same_picture_upright_get_the_same_caption(trained_run, data_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    pairs = []
    for k, path in enumerate(sorted(data_dir.rglob("test_*.png"))[:8]):
        with Image.open(path) as im:
            pairs.append(phone_and_upright(im.convert("RGB"), folder, f"{k}"))
    result = run(sys.executable, "-m", "imcap.caption", f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
                 f"images=[{folder}]", "num_workers=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    captions = dict(line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)
    assert len(captions) == 2 * len(pairs), result.stdout
    for upright, phone in pairs:
        assert captions[str(phone)] == captions[str(upright)], (phone.name, captions)
