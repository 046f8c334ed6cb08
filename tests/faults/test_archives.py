"""Untrusted archives: links in zips, tar link chains, zip bombs, FIFOs and devices, a disk that fills up."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import stat
import subprocess
import sys
import tarfile
import zipfile

import pytest

from imcap.data import extract as extraction
from imcap.data.extract import extract
from imcap.errors import ImcapError


def zip_bytes(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data, zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def tar_bytes(members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info in members:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def written(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def refuse(tmp_path, name: str, data: bytes, message: str):
    path = tmp_path / name
    path.write_bytes(data)
    dest = tmp_path / "root"
    with pytest.raises(ImcapError, match=message) as error:
        extract(path, dest)
    assert "\n" not in str(error.value)
    assert written(dest) == []  # refused before anything was written
    return error


@pytest.mark.parametrize("target", ["..", "data/a.txt"])
def test_a_zip_with_a_symlink_is_refused_whether_it_points_out_or_in(tmp_path, target):
    # dataset zips hold no links: one is refused outright, never created and then judged
    refuse(tmp_path, "link.zip", zip_bytes({"data/a.txt": b"a"}, {"sub/y": target}),
           r"link\.zip: member 'sub/y' is a symlink; refusing to extract this archive")


@pytest.mark.parametrize("order", ["link first", "link last"])
def test_a_tar_link_chain_leading_out_of_the_root_is_refused(tmp_path, order):
    # each link alone looks harmless: sub/y -> .. is the root, x -> sub/y/../etc reads as "sub/etc"
    links = [member("sub/y", tarfile.SYMTYPE, ".."), member("x", tarfile.SYMTYPE, "sub/y/../etc")]
    data = tar_bytes([member("sub", tarfile.DIRTYPE), *(links if order == "link first" else links[::-1])])
    refuse(tmp_path, "chain.tar.gz", data, r"member 'x' leads through the archive's symlink 'sub/y'")


def test_tar_links_that_stay_inside_are_extracted(tmp_path):
    path = tmp_path / "fine.tar.gz"
    path.write_bytes(tar_bytes([member("data/a.txt"), member("z", tarfile.SYMTYPE, "data/a.txt"),
                                member("h", tarfile.LNKTYPE, "data/a.txt")], {"data/a.txt": b"a"}))
    extract(path, tmp_path / "root")
    assert (tmp_path / "root" / "z").read_text() == "a" and (tmp_path / "root" / "h").read_text() == "a"


def test_a_zip_bomb_member_is_refused(tmp_path):
    error = refuse(tmp_path, "bomb.zip", zip_bytes({"ok.txt": b"ok", "zeros.bin": bytes(32 << 20)}),
                   r"member 'zeros.bin' expands \d+x .* more than 200x \(a zip bomb\?\)")
    assert "33,554,432 bytes" in str(error.value)


def test_many_small_members_that_expand_too_much_together_are_refused(tmp_path):
    entries = {f"part{i:02d}.bin": bytes(1 << 20) for i in range(40)}  # each at the per-member floor
    refuse(tmp_path, "many.zip", zip_bytes(entries), r"its contents expand \d+x .* \(a zip bomb\?\)")


def test_a_tar_gz_bomb_is_refused(tmp_path):
    refuse(tmp_path, "bomb.tar.gz", tar_bytes([member("zeros.bin")], {"zeros.bin": bytes(32 << 20)}),
           r"its contents expand \d+x")


def test_contents_larger_than_the_free_space_are_refused_up_front(tmp_path, monkeypatch):
    free = extraction.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(extraction.shutil, "disk_usage", lambda p: free._replace(free=1000))
    refuse(tmp_path, "big.zip", zip_bytes({"a.bin": os.urandom(5000)}),
           r"needs 0\.0 MiB in .*root, which has 0\.0 MiB free; free some space")


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_tar_fifo_and_device_members_are_refused(tmp_path, kind):
    data = tar_bytes([member("ok.txt"), member("dev/thing", kind)], {"ok.txt": b"ok"})
    refuse(tmp_path, "devices.tar.gz", data, r"member 'dev/thing': 'dev/thing' is a special file")


def test_a_disk_that_fills_up_during_extraction_is_one_line_and_redone_next_run(tmp_path):
    """`python -m imcap.data prepare flickr30k` with both archives placed by hand, under an
    RLIMIT_FSIZE of 100 KiB (a full disk that the free-space check cannot see): one error line;
    with room, the next run extracts everything."""
    root = tmp_path / "flickr30k"
    (root / "downloads").mkdir(parents=True)
    karpathy = {"images": [{"filename": "1.jpg", "split": "train", "sentences": [{"raw": "a dog"}]}]}
    (root / "downloads" / "caption_datasets.zip").write_bytes(
        zip_bytes({"dataset_flickr30k.json": json.dumps(karpathy).encode()}))
    big = os.urandom(300_000)  # incompressible: no zip bomb, just too big for the limit
    (root / "downloads" / "flickr-image-dataset.zip").write_bytes(
        zip_bytes({"flickr30k_images/0.jpg": b"small", "flickr30k_images/1.jpg": big}))

    def prepare(limit=None):
        def set_limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return subprocess.run([sys.executable, "-m", "imcap.data", "prepare", "flickr30k", f"data.source.root={root}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              preexec_fn=set_limit if limit else None,
                              env={**os.environ, "IMCAP_ROOT": str(tmp_path), "IMCAP_DOWNLOAD_BASE_URL": ""})

    full = prepare(100 << 10)
    errors = [ln for ln in full.stderr.splitlines() if ln.startswith("error:")]
    assert full.returncode == 2 and len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert re.search(r"cannot extract .*flickr-image-dataset.zip into .*flickr30k_images \(File too large\); "
                     "free some space", errors[0])
    assert not (root / "flickr30k_images" / "1.jpg").exists()  # no half-written file
    ok = prepare()
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (root / "flickr30k_images" / "1.jpg").read_bytes() == big
