"""Untrusted images and image lists: decompression bombs (by their header: nothing large is
allocated here) and records naming files outside the data root."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import pytest
from PIL import Image

from imcap.data.images import load_image, load_image_tensor
from imcap.data.sources.coco import CocoSource
from imcap.data.sources.flickr8k import Flickr8kSource
from imcap.data.sources.flickr30k import Flickr30kSource
from imcap.errors import ImcapError

HUGE = 60_000  # 3.6 G pixels: 10.8 GB as RGB, 20x PIL's default MAX_IMAGE_PIXELS


def huge_jpeg(path):
    """A real 16x16 JPEG whose frame header (SOF0) claims HUGE x HUGE."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, HUGE, HUGE)  # FFC0, length (2), precision (1), height, width
    path.write_bytes(bytes(data))
    return str(path)


def huge_png(path):
    """A PNG whose header (IHDR, with its CRC) claims HUGE x HUGE, with one tiny data chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", HUGE, HUGE, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize("make", [huge_jpeg, huge_png])
@pytest.mark.parametrize("load", [load_image_tensor, load_image])
def test_a_huge_image_is_one_line_naming_the_file_before_any_decoding(tmp_path, make, load):
    path = make(tmp_path / ("huge.jpg" if make is huge_jpeg else "huge.png"))
    with pytest.raises(ImcapError, match=rf"image {path} is too large to decode safely \(.*\); shrink it") as e:
        load(path)
    assert "\n" not in str(e.value)


def test_an_image_under_the_limit_still_decodes_on_the_fast_path(tmp_path):
    path = tmp_path / "ok.jpg"
    Image.new("RGB", (40, 30), "blue").save(path)
    assert tuple(load_image_tensor(str(path)).shape) == (3, 30, 40)


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
