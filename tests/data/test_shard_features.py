"""The per-shard feature cache: written next to the shards once, read after; images that do
not decode stop the run or are left out and counted."""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imcap.data.images import image_transform
from imcap.data.shard_features import extract_shard_features
from imcap.data.streaming import ShardSplit
from imcap.errors import ImcapError


class TinyEncoder(nn.Module):
    """(B, 3, 8, 8) -> grid (B, 4, 2), pooled (B, 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 4, stride=4)

    def forward(self, images):
        grid = self.conv(images).flatten(2).transpose(1, 2)
        return grid, grid.mean(1)


transform = image_transform(8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the encoders' kind: uint8 in


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, "JPEG")
    return buf.getvalue()


def _shard(path, images: list[bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(images):
            ext = "png" if data.startswith(b"\x89PNG") else "jpg"
            for name, payload in ((f"{i:04d}.{ext}", data), (f"{i:04d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_features_are_cached_next_to_each_shard_and_reused(tmp_path):
    shards = [_shard(tmp_path / "a.tar", [_jpeg(10), _jpeg(200)]), _shard(tmp_path / "b.tar", [_jpeg(90)])]
    split = ShardSplit.load("train", shards, None, "error")
    encoder = TinyEncoder()
    paths = extract_shard_features(encoder, split, transform, None, "fp-1", batch_size=4)
    assert [p.rsplit("/", 1)[1].split(".features-")[0] for p in paths] == ["a", "b"]
    grids = [np.load(p) for p in paths]
    assert grids[0].shape == (2, 4, 2) and grids[1].shape == (1, 4, 2)
    with torch.no_grad():
        expected = encoder(torch.stack([transform(torch.full((3, 8, 8), 200, dtype=torch.uint8))]))[0][0]
    assert np.allclose(grids[0][1], expected.numpy(), atol=0.05)  # JPEG of a flat grey is nearly flat
    mtimes = [(tmp_path / p).stat().st_mtime_ns for p in paths]
    assert extract_shard_features(encoder, split, transform, None, "fp-1") == paths
    assert [(tmp_path / p).stat().st_mtime_ns for p in paths] == mtimes  # read, not extracted again
    assert extract_shard_features(encoder, split, transform, None, "fp-2") != paths  # another encoder


def test_an_image_that_does_not_decode_stops_or_is_skipped_and_counted(tmp_path, caplog):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    broken = buf.getvalue()[:60]  # a PNG cut short: its header passes the index's check, decoding fails
    shard = _shard(tmp_path / "a.tar", [_jpeg(10), broken, _jpeg(30)])
    split = ShardSplit.load("train", [shard], None, "error")
    assert split.images == 3
    with pytest.raises(ImcapError, match=r"cannot decode the image of key 0001 in .*a.tar"):
        extract_shard_features(TinyEncoder(), split, transform, tmp_path / "cache-a", "fp", policy="error")
    with caplog.at_level(logging.WARNING):
        extract_shard_features(TinyEncoder(), split, transform, tmp_path / "cache-b", "fp", policy="skip")
    assert "Skipped 1 train images that would not decode" in caplog.text
    assert split.keep[0].tolist() == [0, 2] and split.images == 2
