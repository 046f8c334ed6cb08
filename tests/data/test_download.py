"""Downloads against a local HTTP server on 127.0.0.1 serving archives built here; no network."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tarfile
import time
import zipfile

import pytest

from imcap import reachability, registry
from imcap.data import fetch
from imcap.data.download import prepare, resources_of
from imcap.data.extract import extract
from imcap.data.resources import Resource
from imcap.data.sources.coco import CocoSource
from imcap.errors import ImcapError
from tests.helpers.http_server import closed_port


def _serve(server, name: str, data: bytes, **fields) -> Resource:
    server.files[f"mirror/{name}"] = data
    return Resource(name, url=None if fields.pop("by_hand", False) else f"https://example.invalid/{name}",
                   size=fields.pop("size", len(data)),
                   sha256=fields.pop("sha256", hashlib.sha256(data).hexdigest()), **fields)


def _zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def _tar(entries: dict[str, bytes], symlinks: dict[str, str] | None = None,
         hardlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks), (tarfile.LNKTYPE, hardlinks)):
            for name, target in (links or {}).items():
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                tf.addfile(info)
    return buf.getvalue()


BIG = os.urandom(300_000)


def test_download_verify_extract_then_a_second_run_does_nothing(server, tmp_path):
    root = tmp_path / "root"
    archives = [
        _serve(server, "images.zip", _zip({"images/a.jpg": BIG, "images/sub/b.jpg": b"b"})),
        _serve(server, "text.tar.gz", _tar({"text/captions.txt": b"a dog\n"}, symlinks={"text/latest": "captions.txt"})),
    ]
    report = prepare(root, archives, "demo", base_url=server.url)
    assert [line.split()[0] for line in report] == ["placed", "placed"]
    assert (root / "images" / "a.jpg").read_bytes() == BIG and (root / "images/sub/b.jpg").read_bytes() == b"b"
    assert os.readlink(root / "text" / "latest") == "captions.txt"
    assert not (root / "downloads" / "images.zip").exists()  # archives go once extracted
    served = len(server.requests)
    report = prepare(root, archives, "demo", base_url=server.url)
    assert len(server.requests) == served and all(line.startswith("ok") for line in report)
    assert "2 files verified" in report[0]
    (root / "images" / "sub" / "b.jpg").unlink()  # damage: the marker check notices
    prepare(root, archives, "demo", base_url=server.url)
    assert (root / "images" / "sub" / "b.jpg").read_bytes() == b"b"
    assert [r[0] for r in server.requests[served:]] == ["mirror/images.zip"]


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    archive = _serve(server, "big.zip", _zip({"big.bin": BIG}))
    server.cut["mirror/big.zip"] = 100_000
    prepare(tmp_path, [archive], "demo", base_url=server.url)
    assert server.requests == [("mirror/big.zip", None), ("mirror/big.zip", "bytes=100000-")]
    assert (tmp_path / "big.bin").read_bytes() == BIG  # sha256 over both parts matched


def test_partial_file_of_an_earlier_run_is_resumed_or_restarted(server, tmp_path):
    data = _zip({"big.bin": BIG})
    archive = _serve(server, "big.zip", data)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "big.zip.part").write_bytes(data[:123_456])
    prepare(tmp_path, [archive], "demo", base_url=server.url)
    assert server.requests == [("mirror/big.zip", "bytes=123456-")]
    # a server without Range support answers 200: the download starts over, still verified
    server.ranges, server.requests[:] = False, []
    (tmp_path / "downloads" / "big.zip.part").write_bytes(b"junk that must not survive")
    prepare(tmp_path / "again", [archive], "demo", base_url=server.url)
    assert (tmp_path / "again" / "big.bin").read_bytes() == BIG


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_checksum_or_size_mismatch_is_refused_and_nothing_extracted(server, tmp_path, field):
    wrong = {"sha256": "0" * 64, "size": 12}[field]
    archive = _serve(server, "data.zip", _zip({"x.txt": b"x"}), **{field: wrong})
    with pytest.raises(ImcapError, match=rf"data.zip is not the expected file \(.*expected {wrong}\).*re-run"):
        prepare(tmp_path, [archive], "demo", base_url=server.url)
    assert (tmp_path / "downloads" / "data.zip.corrupt").is_file()
    assert not (tmp_path / "x.txt").exists() and not list(tmp_path.glob("downloads/*.done.json"))


MALICIOUS = {
    "traversal.zip": (_zip({"ok.txt": b"ok", "../evil.txt": b"evil"}), "'..'"),
    "absolute.zip": (_zip({"ok.txt": b"ok", "/tmp/imcap-evil.txt": b"evil"}), "absolute path"),
    "zip-symlink.zip": (_zip({"ok.txt": b"ok"}, links={"link": "../../outside"}), "member 'link' is a symlink"),
    "zip-inner-symlink.zip": (_zip({"ok.txt": b"ok"}, links={"link": "ok.txt"}), "member 'link' is a symlink"),
    "tar-symlink.tar.gz": (_tar({"ok.txt": b"ok"}, symlinks={"etc": "/etc"}), "member 'etc': 'etc' is a link to an absolute path"),
    "tar-through-link.tar.gz": (_tar({"d/evil.txt": b"evil"}, symlinks={"d": "sub"}),
                                "member 'd/evil.txt' leads through the archive's symlink 'd'"),
    "tar-hardlink.tar.gz": (_tar({"ok.txt": b"ok"}, hardlinks={"h": "../outside.txt"}), "member 'h': 'h' would link to"),
    "tar-traversal.tar.gz": (_tar({"a/../../evil.txt": b"evil"}), "'..'"),
}


@pytest.mark.parametrize("name", list(MALICIOUS))
def test_malicious_archives_are_refused_before_anything_is_written(server, tmp_path, name):
    data, message = MALICIOUS[name]
    root = tmp_path / "root"
    with pytest.raises(ImcapError, match=re.escape(message)):
        prepare(root, [_serve(server, name, data)], "demo", base_url=server.url)
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if "downloads" not in p.parts)
    assert written == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"] and not os.path.exists("/tmp/imcap-evil.txt")


@pytest.mark.parametrize("name", ["a.zip", "a.tar.gz"])
def test_a_symlink_already_on_disk_is_not_followed_out_of_the_root(tmp_path, name):
    outside, root = tmp_path / "outside", tmp_path / "root"
    outside.mkdir()
    root.mkdir()
    os.symlink(outside, root / "images")  # e.g. left by an earlier, unchecked tool
    path = tmp_path / name
    path.write_bytes((_zip if name.endswith("zip") else _tar)({"images/a.jpg": b"a"}))
    with pytest.raises(ImcapError, match=r"root/images leads outside .*root \(a symlink on disk\)"):
        extract(path, root)
    assert list(outside.iterdir()) == []


def test_members_extracts_only_the_named_files(tmp_path):
    path = tmp_path / "caption_datasets.zip"
    path.write_bytes(_zip({"caption_datasets/dataset_coco.json": b"{}", "caption_datasets/dataset_flickr8k.json": b"[]"}))
    files = extract(path, tmp_path / "out", members=("dataset_flickr8k.json",))
    assert [f.as_posix() for f in files] == ["dataset_flickr8k.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dataset_flickr8k.json"]
    with pytest.raises(ImcapError, match=r"does not contain \['dataset_flickr30k.json'\]"):
        extract(path, tmp_path / "out2", members=("dataset_flickr30k.json",))


def test_offline_fails_fast_naming_the_files_and_the_folder(tmp_path, monkeypatch):
    archives = [Resource("a.zip", "https://example.invalid/a.zip"), Resource("b.zip", "https://example.invalid/b.zip")]
    start = time.monotonic()
    with pytest.raises(ImcapError) as err:
        prepare(tmp_path, archives, "demo", base_url=f"http://127.0.0.1:{closed_port()}")
    message = str(err.value)
    assert time.monotonic() - start < 5 and "\n" not in message
    assert message.startswith("cannot reach 127.0.0.1 (ConnectionRefusedError")
    assert "a.zip from http://127.0.0.1" in message and "b.zip from" in message
    assert f"put the files in {tmp_path / 'downloads'}/" in message
    # a host that never answers (a hanging DNS lookup, a black-holed route) is cut off too
    def never_answers(*args, **kwargs):
        time.sleep(3)
        raise OSError("too late")

    monkeypatch.setattr(reachability.socket, "create_connection", never_answers)
    start = time.monotonic()
    monkeypatch.delenv(fetch.BASE_URL_ENV, raising=False)
    with pytest.raises(ImcapError, match=r"cannot reach cs.stanford.edu \(no answer from cs.stanford.edu "
                                         r"within 0.3 s\): download by hand caption_datasets.zip from https://"):
        prepare(tmp_path, CocoSource(str(tmp_path)).resources(), "coco", timeout=0.3)
    assert time.monotonic() - start < 3


def test_sign_up_archives_are_placed_by_hand_then_verified_and_extracted(tmp_path, server):
    data = _zip({"flickr30k_images/results.csv": b"image_name| comment_number| comment\n"})
    archive = _serve(server, "flickr-image-dataset.zip", data, by_hand=True, manual="the Kaggle page",
                     present=("flickr30k_images",))
    with pytest.raises(ImcapError, match=r"only a sign-up gives: download by hand flickr-image-dataset.zip "
                                         r"from the Kaggle page; put the files in .*downloads/"):
        prepare(tmp_path, [archive], "flickr30k")
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / archive.filename).write_bytes(data)
    assert prepare(tmp_path, [archive], "flickr30k")[0].startswith("placed")
    assert server.requests == []
    fresh = tmp_path / "fresh"
    (fresh / "flickr30k_images").mkdir(parents=True)  # extracted by hand
    assert "placed by hand, not verified" in prepare(fresh, [archive], "flickr30k")[0]


def test_http_errors_are_one_line(server, tmp_path):
    archive = Resource("nothere.zip", "https://example.invalid/nothere.zip")
    with pytest.raises(ImcapError, match=r"HTTP 404 .* for http://127.0.0.1:\d+/mirror/nothere.zip"):
        prepare(tmp_path, [archive], "demo", base_url=server.url)


def test_every_registered_source_declares_well_formed_resources(tmp_path):
    assert [r.filename for r in CocoSource(str(tmp_path), year=2017).resources()] == [
        "annotations_trainval2017.zip", "val2017.zip", "train2017.zip"]
    assert "dataset_coco.json" in CocoSource(str(tmp_path)).resources()[0].members
    declared = {}
    for name, cls in registry.components("source").items():
        if not cls.__module__.startswith("imcap."):  # an installed plugin's may take other arguments
            continue
        declared[name] = resources_of(cls(str(tmp_path / name)))  # imcap's sources take their root first
        for r in declared[name]:
            assert r.url or r.manual, (name, r.filename)
            assert r.url is None or r.url.endswith(r.filename)
            assert r.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", r.sha256)
            assert r.size is None or r.size > 0
            assert r.present, "without `present`, hand-placed data would be downloaded again"
    assert declared["shapes"] == () and declared["custom"] == ()  # generated / the user's own
    assert {n for n, r in declared.items() if r} >= {"coco", "flickr8k", "flickr30k"}
