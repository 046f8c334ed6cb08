"""The per-shard feature cache: written next to the shards once, read after; images that do
not decode stop the run or are left out and counted."""

from __future__ import annotations

import builtins
import io
import logging
import os
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
from imcap.models.encoders import GridEncoder


class TinyEncoder(GridEncoder):
    """(B, 3, 8, 8) -> grid (B, 4, 2), pooled (B, 2)."""

    out_channels = 2

    def __init__(self):
        super().__init__()
        self.trunk = nn.Conv2d(3, 2, 4, stride=4)

    def forward(self, images):
        grid = self.trunk(images).flatten(2).transpose(1, 2)
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


def test_a_shards_list_of_bad_images_is_never_written_where_another_rank_reads_it(tmp_path, monkeypatch):
    """Another DDP rank that finds a shard's features reads its list of bad images without the
    lock, so the list must appear whole: written beside it and moved into place (written in place,
    a rank of a 2-rank run read it empty and crashed with JSONDecodeError)."""
    shard = _shard(tmp_path / "a.tar", [_jpeg(10), _jpeg(90)])
    opened_for_writing = []
    real_open = io.open

    def recording_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+"):
            opened_for_writing.append(os.path.basename(os.fspath(file)))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", recording_open)
    monkeypatch.setattr(builtins, "open", recording_open)
    (path,) = extract_shard_features(TinyEncoder(), ShardSplit.load("train", [shard], None, "error"), transform,
                                     None, "fp")
    bad_list = os.path.basename(path).removesuffix(".npy") + ".json"
    assert os.path.exists(os.path.join(os.path.dirname(path), bad_list))
    assert bad_list not in opened_for_writing, opened_for_writing


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


@pytest.mark.timeout(120)
def test_waiting_for_another_process_on_a_shard_is_logged_and_bounded(tmp_path, caplog):
    """A second process holds a shard's lock (a stuck extractor): the waiter says which lock it
    waits for, gives up after the timeout without progress with one line naming the lock file
    and what to do, and extracts once the holder is gone."""
    import subprocess
    import sys

    from imcap.data.shard_features import feature_path

    shard = _shard(tmp_path / "a.tar", [_jpeg(10)])
    lock = feature_path(shard, None, "fp-1", "float16", "fp32").with_suffix(".lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level(logging.INFO, "imcap.data.features"), \
                pytest.raises(ImcapError, match=rf"another process has held {lock} for 0.5 s without progress; "
                                                r"stop it if it is stuck, or wait longer with IMCAP_FEATURE_LOCK_TIMEOUT"):
            extract_shard_features(TinyEncoder(), ShardSplit.load("train", [shard], None, "error"), transform, None,
                                   "fp-1", lock_timeout=0.5)
        assert f"Waiting for another process that is extracting shard {shard} features into {lock}" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    paths = extract_shard_features(TinyEncoder(), ShardSplit.load("train", [shard], None, "error"), transform, None,
                                   "fp-1", lock_timeout=0.5)
    assert np.load(paths[0]).shape[0] == 1
    assert not list(tmp_path.glob("*.progress"))  # removed once the features are in place
