"""Shards in img2dataset's layout: written from records, indexed, read back; bad samples."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import pytest
from PIL import Image

from imcap.data.records import CaptionRecord
from imcap.data.shards import index_path, load_index, read_image_bytes, usable, write_shards
from imcap.errors import ImcapError


def _image(tmp_path, name: str, fmt: str = "PNG", color=(200, 30, 30)) -> str:
    path = tmp_path / name
    Image.new("RGB", (8, 8), color).save(path, fmt)
    return str(path)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, "JPEG")
    return buf.getvalue()


def test_written_shards_read_back_as_the_records(tmp_path):
    records = [CaptionRecord(f"img{i}", _image(tmp_path, f"{i}.png" if i % 2 else f"{i}.jpg", "PNG" if i % 2 else "JPEG"),
                             tuple(f"caption {j} of image {i}" for j in range(1 + i % 3)), "train")
               for i in range(7)]
    shards = write_shards(records, tmp_path / "shards", shard_size=3)
    assert [p.rsplit("/", 1)[1] for p in shards] == ["000000.tar", "000001.tar", "000002.tar"]
    samples = [s for shard in shards for s in load_index(shard)]
    assert [s.image_id for s in samples] == [r.image_id for r in records]
    assert [s.captions for s in samples] == [r.captions for r in records]
    assert all(s.problem is None for s in samples)
    by_shard = [(shard, s) for shard in shards for s in load_index(shard)]
    for (shard, sample), record in zip(by_shard, records):
        with open(record.image_path, "rb") as f:
            assert read_image_bytes(shard, sample) == f.read()  # copied byte for byte
    assert index_path(shards[0], None).is_file()  # cached next to the shard


def test_index_cache_under_cache_dir_and_rebuilt_when_the_shard_changes(tmp_path):
    record = CaptionRecord("a", _image(tmp_path, "a.png"), ("one",), "train")
    shard = write_shards([record], tmp_path / "shards", shard_size=5)[0]
    cache = tmp_path / "cache"
    assert load_index(shard, cache)[0].captions == ("one",)
    assert index_path(shard, cache).is_file() and not index_path(shard, None).exists()
    write_shards_again = [CaptionRecord("a", record.image_path, ("two", "three"), "train")]
    (tmp_path / "shards" / "000000.tar").unlink()
    shard = write_shards(write_shards_again, tmp_path / "shards", shard_size=5)[0]
    assert load_index(shard, cache)[0].captions == ("two", "three")


def test_img2dataset_layout_single_caption_in_txt_and_json(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "000010001.jpg", _jpeg())
        _add(tar, "000010001.txt", b"a green square")
        _add(tar, "000010001.json", json.dumps({"caption": "a green square", "url": "http://x"}).encode())
        _add(tar, "000010002.jpg", _jpeg())
        _add(tar, "000010002.json", json.dumps({"caption": "only in json", "key": "000010002"}).encode())
    samples = load_index(shard)
    assert [(s.key, s.image_id, s.captions) for s in samples] == [
        ("000010001", "000010001", ("a green square",)), ("000010002", "000010002", ("only in json",))]


def test_bad_samples_stop_or_are_skipped_and_counted(tmp_path, caplog):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "a.jpg", _jpeg())
        _add(tar, "a.txt", b"fine")
        _add(tar, "b.txt", b"no image here")
        _add(tar, "c.jpg", _jpeg())
        _add(tar, "c.txt", b"  \n")
        _add(tar, "d.jpg", b"this is not an image")
        _add(tar, "d.txt", b"broken image")
    samples = load_index(shard)
    assert [s.problem for s in samples] == [None, "no image", "no captions", "not an image"]
    with pytest.raises(ImcapError, match=r"3 train samples cannot be used \(first: key b in .*no image\).*bad_samples=skip"):
        usable([(str(shard), samples)], "error", "train")
    with caplog.at_level(logging.WARNING):
        usable([(str(shard), samples)], "skip", "train")
    assert "Skipped 3 of 4 train samples (1 no captions, 1 no image, 1 not an image; first: key b" in caplog.text
    with pytest.raises(ImcapError, match="data.bad_samples='drop'"):
        usable([(str(shard), samples)], "drop", "train")


def test_a_broken_tar_is_a_one_line_error(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"\x00" * 100 + b"garbage" * 100)
    with pytest.raises(ImcapError, match="not a readable tar file"):
        load_index(shard)
    with pytest.raises(ImcapError, match="shard not found"):
        load_index(tmp_path / "missing.tar")
