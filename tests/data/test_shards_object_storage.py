"""Shards in object storage, against a real S3-compatible server (moto's) on 127.0.0.1: written
with `python -m imcap.data shards out=s3://...`, indexed and feature-cached on local disk,
streamed to 2 DDP ranks with every caption once, resumed after kill -9; credentials never shown."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import boto3
import fsspec
import numpy as np
import pytest
import torch
from moto.server import ThreadedMotoServer
from PIL import Image

from imcap.data import shards as shards_module
from imcap.data.records import CaptionRecord
from imcap.data.shard_features import extract_shard_features
from imcap.data.shards import (
    endpoint_of,
    index_path,
    load_index,
    read_image_bytes,
    read_images,
    write_shards,
)
from imcap.data.streaming import (
    ShardSplit,
    ShardStream,
    StreamingLoader,
    decode_image,
    expand_shards,
)
from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from tests.data.test_shard_features import TinyEncoder, transform
from tests.data.test_streaming import TINY_TRAIN, seen_per_epoch
from tests.helpers.paths import ROOT
from tests.helpers.runs import assert_one_line_error, kill_9_once_marked, run

SECRET = "imcapTestSecret0123456789abcdefSECRET"  # must never appear in what a run prints or logs


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with bucket `shards`; yields the environment a user sets."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "imcap-test-key",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process's own reads (the unit tests below) find the server too
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="shards")
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _records(folder: Path, count: int) -> list[CaptionRecord]:
    records = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        Image.new("RGB", (8, 8), (i * 10, 100, 0)).save(path, "JPEG")
        records.append(CaptionRecord(i, str(path), tuple(f"image {i} caption {j}" for j in range(1 + i % 3)), "train"))
    return records


def test_shards_written_to_s3_are_indexed_on_local_disk_and_streamed_once_per_epoch(s3, tmp_path):
    records = _records(tmp_path, 11)
    shards = write_shards(records, "s3://shards/unit/train", shard_size=4)
    assert shards == [f"s3://shards/unit/train/{i:06d}.tar" for i in range(3)]
    shards_module._REMOTE_STAMPS.clear()  # as a new process: the stamps come from the listing below
    assert expand_shards("s3://shards/unit", "train/*.tar") == shards
    assert expand_shards("s3://shards/unit", "train/{000001..000002}.tar") == shards[1:]
    cache = tmp_path / "cache"
    samples = load_index(shards[0], cache)
    assert index_path(shards[0], cache) == cache / "s3" / "shards" / "unit" / "train" / "000000.index.json"
    sidecar = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"]).get_object(
        Bucket="shards", Key="unit/train/000000.index.json")["Body"].read()
    assert index_path(shards[0], cache).read_bytes() == sidecar  # copied from beside the shard, not rebuilt
    assert [s.image_id for s in samples] == [0, 1, 2, 3]
    assert read_image_bytes(shards[0], samples[2]) == Path(records[2].image_path).read_bytes()  # a range request
    local = write_shards(records[:2], tmp_path / "local", shard_size=2)[0]
    located = [(shards[1], load_index(shards[1], cache)[1]), (local, load_index(local)[0]), (shards[0], samples[2])]
    assert read_images(located) == [Path(records[i].image_path).read_bytes() for i in (5, 0, 2)]  # a batch's files
    assert not list(Path(tempfile.gettempdir()).glob("imcap-shards-*"))  # staged shards are removed once uploaded

    split = ShardSplit.load("train", shards, str(cache), "error")
    vocab = Vocabulary.build([["image", "caption"]])
    expected = sorted(f"{Path(s).name}/{x.key}#{c}" for s in shards for x in load_index(s, cache)
                      for c in range(len(x.captions)))
    seen = []
    for rank in (0, 1):
        ds = ShardStream(split, vocab, True, 4, seed=1, shuffle_buffer=8, max_length=10, per_image=None,
                         cache_dir=str(cache), transform=transform)
        ds.rank, ds.world = rank, 2
        for batch in StreamingLoader(ds, epoch=lambda: 0, trained=lambda: 0, num_workers=2):  # forked workers read S3
            for item_id, image in zip(batch["item_ids"], batch["images"]):
                record = records[int(item_id.split("/")[1].split("#")[0])]  # keys count the records
                expected_image = transform(decode_image(Path(record.image_path).read_bytes(), "", tensor=True))
                assert torch.equal(image, expected_image)
            seen += batch["item_ids"]
    assert sorted(seen) == expected


def test_shards_of_other_writers_without_an_index_beside_them_are_indexed_from_the_store(s3, tmp_path):
    """img2dataset's shards: a tar with KEY.jpg + KEY.txt, uploaded by another program."""
    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w") as f:
        for key, caption in (("000000001", b"a red square"), ("000000002", b"a green square")):
            for name, payload in ((f"{key}.jpg", Path(_records(tmp_path, 1)[0].image_path).read_bytes()),
                                  (f"{key}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                f.addfile(info, io.BytesIO(payload))
    boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"]).upload_file(str(tar), "shards", "img2dataset/00000.tar")
    samples = load_index("s3://shards/img2dataset/00000.tar", tmp_path / "cache")
    assert [(s.key, s.captions) for s in samples] == [("000000001", ("a red square",)),
                                                       ("000000002", ("a green square",))]
    with pytest.raises(ImcapError, match=r"shard not found: s3://shards/img2dataset/missing.tar; check data.root"):
        load_index("s3://shards/img2dataset/missing.tar", tmp_path / "cache")
    with pytest.raises(ImcapError, match=r"shards in object storage \(s3://shards/img2dataset/00000.tar\) need a "
                                         r"local folder .*set data.cache_dir=DIR"):
        load_index("s3://shards/img2dataset/00000.tar", None)


def test_the_feature_cache_of_remote_shards_is_on_local_disk_and_equals_the_local_one(s3, tmp_path):
    records = _records(tmp_path, 5)
    remote = write_shards(records, "s3://shards/features/train", shard_size=3)
    local = write_shards(records, tmp_path / "local", shard_size=3)
    encoder, cache = TinyEncoder(), tmp_path / "cache"
    paths = extract_shard_features(encoder, ShardSplit.load("train", remote, str(cache), "error"), transform,
                                   str(cache), "fp-1")
    assert all(Path(p).is_relative_to(cache / "s3" / "shards" / "features" / "train") for p in paths)
    expected = extract_shard_features(encoder, ShardSplit.load("train", local, None, "error"), transform, None, "fp-1")
    for got, want in zip(paths, expected):
        assert np.array_equal(np.load(got), np.load(want))
    # on local disk: each shard's index and features, no downloaded shard left behind
    left = sorted(p.name.split(".", 1)[1].split("-")[0] for p in cache.rglob("*") if p.is_file())
    assert not list(cache.rglob("*.tar"))
    assert set(left) == {"index.json", "index.lock", "features"}


def test_an_unreachable_endpoint_is_a_one_line_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "imcap.train", "data=shards", "data.root=s3://shards/nowhere", "trainer.max_epochs=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "IMCAP_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT),
             "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"error: cannot reach s3://shards/nowhere/train/*.tar at http://127.0.0.1:{port} (Could not connect to the " \
           "endpoint URL" in done.stderr
    assert "check the endpoint (for S3: AWS_ENDPOINT_URL)" in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_an_endpoint_that_accepts_connections_but_never_answers_is_a_one_line_error(tmp_path):
    """A hung server (or a wrong port behind a proxy): the first request gives up after
    FIRST_CONTACT_TIMEOUT, once, instead of every call's retries timing out for many minutes."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections (the kernel's backlog) and never answers
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "imcap.train", "data=shards", "data.root=s3://shards/silent", "trainer.max_epochs=1"],
            cwd=tmp_path, capture_output=True, text=True, timeout=180,  # a hang guard: it took over 300 s
            env={**os.environ, "IMCAP_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT),
                 "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k",
                 "AWS_SECRET_ACCESS_KEY": SECRET})
    finally:
        listener.close()
    assert_one_line_error(done, f"error: cannot reach s3://shards/silent/train/*.tar: its endpoint {endpoint} accepted "
                                "the connection but did not answer within 5 s; check the endpoint")
    assert SECRET not in done.stdout + done.stderr


# -- an endpoint that answers, but without the shards: which endpoint, and whether the bucket is there --
class NotFoundHandler(http.server.BaseHTTPRequestHandler):
    """A web server, a proxy or a path-style URL with a wrong path as the S3 endpoint: 404 to everything."""

    def _not_found(self) -> None:
        self.send_error(404)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _not_found  # noqa: N815 (http.server's naming)

    def log_message(self, *args):
        pass


class WebPageHandler(http.server.BaseHTTPRequestHandler):
    """A web server with a catch-all page as the S3 endpoint: 200 and the same page to everything."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        page = b"<html><body>Welcome</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]):
    """The URL of a server on 127.0.0.1 answering with `handler`, while in the block."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def not_found():
    """The URL of a server on 127.0.0.1 that answers 404 to every request."""
    with serving(NotFoundHandler) as url:
        yield url


def test_an_endpoint_that_answers_404_to_everything_is_named_not_taken_for_missing_shards(not_found, tmp_path):
    env = {"PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    trained = run(sys.executable, "-m", "imcap.train", "data=shards", "data.root=s3://shards/flickr8k", cwd=tmp_path,
                  env={**env, "AWS_ENDPOINT_URL": f"{not_found}/s3"})
    assert_one_line_error(trained, "error: no train shards match data.train='train/*.tar' under data.root=s3://shards/"
                                   f"flickr8k: {not_found}/s3 answered HTTP 404 to a listing of the bucket shards, with no "
                                   "S3 error: it is not an S3 endpoint", "check the endpoint (AWS_ENDPOINT_URL")
    written = run(sys.executable, "-m", "imcap.data", "shards", "out=s3://shards/flickr8k", cwd=tmp_path,
                  env={**env, "AWS_ENDPOINT_URL": not_found})
    assert_one_line_error(written, f"error: cannot write shards to s3://shards/flickr8k: {not_found} answered HTTP 404 to "
                                   "a listing of the bucket shards, with no S3 error", "check the endpoint (AWS_ENDPOINT_URL")
    assert SECRET not in trained.stdout + trained.stderr + written.stdout + written.stderr
    # an endpoint is named without the user:password@ its URL may carry
    with_password = fsspec.filesystem("s3", endpoint_url=not_found.replace("://", "://user:pa55word@"),
                                      skip_instance_cache=True)
    assert endpoint_of(with_password) == not_found


def test_an_endpoint_that_answers_a_web_page_to_everything_is_named(tmp_path, monkeypatch):
    """botocore takes a web page for an empty listing: the bucket would seem to hold nothing."""
    from hydra.utils import instantiate

    from imcap.config_compose import compose_config

    monkeypatch.setattr(fsspec.config, "conf", {})  # data.storage_options goes there
    for name, value in (("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", SECRET), ("IMCAP_ROOT", str(tmp_path))):
        monkeypatch.setenv(name, value)
    with serving(WebPageHandler) as page:
        data = instantiate(compose_config("train", ["data=shards", "data.root=s3://shards/flickr8k",
                                                    f'data.storage_options={{s3:{{endpoint_url:"{page}"}}}}']).data)
        with pytest.raises(ImcapError, match=rf"data.root=s3://shards/flickr8k: {page} answered HTTP 200 to a listing "
                                             r"of the bucket shards, with no S3 listing: it is not an S3 endpoint"):
            data.prepare_data()
    fsspec.AbstractFileSystem.clear_instance_cache()


def test_a_missing_bucket_is_named_with_its_endpoint_not_taken_for_missing_shards(s3, tmp_path):
    done = run(sys.executable, "-m", "imcap.train", "data=shards", "data.root=s3://no-such-bucket/flickr8k", cwd=tmp_path,
               env={"PYTHONPATH": str(ROOT)})  # the server's environment, from the fixture
    assert_one_line_error(done, "error: no train shards match data.train='train/*.tar' under data.root=s3://no-such-"
                                f"bucket/flickr8k: the bucket no-such-bucket does not exist at {s3['AWS_ENDPOINT_URL']}; "
                                "check the bucket in data.root, and the endpoint (AWS_ENDPOINT_URL")
    assert SECRET not in done.stdout + done.stderr
    # writing asks before any shard is made; a shard named without a glob says the same
    with pytest.raises(ImcapError, match=r"^cannot write shards to s3://no-such-bucket/flickr8k/train: the bucket "
                                         rf"no-such-bucket does not exist at {s3['AWS_ENDPOINT_URL']}; create it"):
        write_shards(_records(tmp_path, 1), "s3://no-such-bucket/flickr8k/train", shard_size=1)
    with pytest.raises(ImcapError, match=r"^shard not found: s3://no-such-bucket/flickr8k/train/000000.tar: the bucket "
                                         rf"no-such-bucket does not exist at {s3['AWS_ENDPOINT_URL']}; check the bucket"):
        load_index("s3://no-such-bucket/flickr8k/train/000000.tar", tmp_path / "cache")


def test_credentials_that_may_write_but_not_list_still_write_shards(s3, tmp_path, monkeypatch):
    """Asking the bucket before writing must not refuse a writer whose listing is denied
    (a write-only policy): the upload itself is what tells."""

    def denied(*args, **kwargs):
        raise PermissionError("AccessDenied: s3:ListBucket")

    monkeypatch.setattr(shards_module, "_list", denied)
    write_shards(_records(tmp_path, 2), "s3://shards/write-only/train", shard_size=1)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
            .list_objects_v2(Bucket="shards", Prefix="write-only/")["Contents"]]
    assert sum(k.endswith(".tar") for k in keys) == 2, keys


def test_a_bucket_without_matching_shards_says_what_it_holds(s3, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    from imcap.config_compose import compose_config

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    for key in ("bad-layout/shards/000000.index.json", "bad-layout/shards/000000.tar"):
        client.put_object(Bucket="shards", Key=key, Body=b"")
    monkeypatch.setenv("IMCAP_ROOT", str(tmp_path))
    monkeypatch.delenv("IMCAP_DATA_DIR", raising=False)
    where = f"the bucket shards at {s3['AWS_ENDPOINT_URL']}"
    for root, said in (
        ("s3://shards/bad-layout", f"{where} holds under bad-layout/: shards/000000.index.json, shards/000000.tar; "
                                   "check data.root and data.train$"),
        ("s3://shards/bad-layuot", rf"{where} holds nothing under bad-layuot/ \(at its top: bad-layout/[,)].*; check "
                                   "data.root, or write shards there with `python -m imcap.data shards data=NAME "
                                   "out=s3://shards/bad-layuot`$")):
        data = instantiate(compose_config("train", ["data=shards", f"data.root={root}"]).data)
        with pytest.raises(ImcapError) as error:
            data.prepare_data()
        assert re.search(f"^no train shards match data.train='train/\\*.tar' under data.root={root}: {said}",
                         str(error.value)), str(error.value)


# -- as users run it: write to the bucket, train on 2 ranks, kill -9, resume ---------------------------
def _run_env(home: Path, s3: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **s3, "IMCAP_ROOT": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("IMCAP_DATA_DIR", None)  # the shard cache under IMCAP_ROOT/data, where the test looks
    return env


def _train_cmd(out: Path, record: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "imcap.train", *TINY_TRAIN, "data.root=s3://shards/shapes",
            f"hydra.run.dir={out}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.max_epochs=2", "data.num_workers=2", "+callbacks.last_checkpoint.every_n_train_steps=4",
            "+callbacks.record._target_=tests.helpers.callbacks.RecordItems", f"+callbacks.record.path={record}", *extra]


@pytest.mark.slow
def test_two_ranks_from_s3_see_every_caption_once_and_resume_after_kill_9(s3, tmp_path):
    """48 images x 5 captions written to s3://shards/shapes; 2 gloo ranks of batch 8: 15 steps
    an epoch. The first run checkpoints every 4 steps and is killed -9 while both ranks wait
    before step 10 (last checkpoint: step 8); the resumed run finishes epoch 0 and trains epoch 1."""
    env = _run_env(tmp_path, s3)
    written = subprocess.run([sys.executable, "-m", "imcap.data", "shards", "out=s3://shards/shapes", "shard_size=16",
                              "data.source.num_images={train:48,val:8,test:8}", "data.source.image_size=64"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert written.returncode == 0, written.stderr[-3000:]
    assert "train       48 images      3 shards" in written.stdout and "s3://shards/shapes/train" in written.stdout
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="shards", Prefix="shapes/train/")["Contents"])
    assert keys == [f"shapes/train/{i:06d}.{ext}" for i in range(3) for ext in ("index.json", "tar")]

    record, run = tmp_path / "seen", tmp_path / "run"
    kill_9_once_marked(_train_cmd(run, record, "+callbacks.record.stop_at_step=10"), Path(f"{record}.stopped"),
                       cwd=tmp_path, env=env, log=tmp_path / "first.log")  # both ranks and their workers
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 8
    first = seen_per_epoch(record, max_step=8)
    for path in tmp_path.glob("seen.rank*.jsonl"):
        path.rename(path.with_name("first-" + path.name))

    done = subprocess.run(_train_cmd(tmp_path / "resumed", record, f"ckpt_path={ckpt}"), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming epoch 0 of the train shards after 8 of 15 batches" in done.stdout + done.stderr
    after = seen_per_epoch(record)
    cache = tmp_path / "data" / "shard-cache" / "s3" / "shards" / "shapes" / "train"
    expected = sorted(f"{i:06d}.tar/{s.key}#{c}" for i in range(3)
                      for s in load_index(f"s3://shards/shapes/train/{i:06d}.tar", cache.parents[3])
                      for c in range(len(s.captions)))
    assert len(expected) == 240
    assert sorted(first[0] + after[0]) == expected  # killed and resumed: each caption once
    assert sorted(after[1]) == expected

    # local disk: per shard its index and features (no copy of the shard); no credentials anywhere
    assert sorted(p.name.split(".")[1].split("-")[0] for p in cache.glob("*.npy")) == ["features"] * 3
    assert not list(cache.glob("*.tar"))
    shown = [written.stdout, written.stderr, done.stdout, done.stderr,
             *(p.read_text(errors="replace") for p in tmp_path.glob("first.*")),
             *(p.read_text(errors="replace") for d in (run, tmp_path / "resumed") for p in d.rglob("*")
               if p.is_file() and p.suffix in (".log", ".yaml", ".json", ".txt"))]
    assert not [text for text in shown if SECRET in text]


# -- other stores: a web server, file:// URLs, a store whose package is missing --------------------
class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` as web servers serve shards: HEAD, and GET with `Range: bytes=A-B`."""

    def _send(self, body: bool) -> None:
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        wanted = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        start, stop = (int(wanted[1]), int(wanted[2] or len(data) - 1) + 1) if wanted else (0, len(data))
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        if body:
            self.wfile.write(data[start:stop])

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self._send(body=False)

    def do_GET(self):  # noqa: N802
        self._send(body=True)

    def log_message(self, *args):
        pass


def test_shards_on_a_web_server_are_read_by_range_requests(tmp_path):
    records = _records(tmp_path, 5)
    shards = write_shards(records, tmp_path / "site" / "train", shard_size=3)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files = {f"train/{Path(s).name}": Path(s).read_bytes() for s in shards}  # no index beside them
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        root = f"http://user:pa55word@127.0.0.1:{httpd.server_address[1]}"
        urls = expand_shards(root, "train/{000000..000001}.tar")
        assert urls == [f"{root}/train/00000{i}.tar" for i in range(2)]
        cache = tmp_path / "cache"
        samples = load_index(urls[1], cache)
        assert index_path(urls[1], cache) == cache / "http" / f"127.0.0.1_{httpd.server_address[1]}" / "train" / \
            "000001.index.json"  # the folder names no credentials
        assert [s.image_id for s in samples] == [3, 4]
        assert read_image_bytes(urls[1], samples[1]) == Path(records[4].image_path).read_bytes()
        with pytest.raises(ImcapError) as missing:
            load_index(f"{root}/train/000009.tar", cache)
        assert "pa55word" not in str(missing.value) and f"127.0.0.1:{httpd.server_address[1]}/train/000009.tar" in \
            str(missing.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_file_urls_are_local_shards(tmp_path):
    shards = write_shards(_records(tmp_path, 4), f"file://{tmp_path}/shards/train", shard_size=2)
    assert shards == [str(tmp_path / "shards" / "train" / f"00000{i}.tar") for i in range(2)]
    assert expand_shards(f"file://{tmp_path}/shards", "train/*.tar") == shards
    assert [s.image_id for s in load_index(f"file://{shards[1]}")] == [2, 3]
    assert index_path(f"file://{shards[1]}", None) == tmp_path / "shards" / "train" / "000001.index.json"


def test_a_store_without_its_package_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
    with pytest.raises(ImcapError, match=r"gs:// URLs need fsspec's gs filesystem .*pip install gcsfs"):
        load_index("gs://bucket/train/000000.tar", tmp_path)


def test_storage_options_set_the_endpoint(s3, tmp_path, monkeypatch):
    """data.storage_options={s3:{endpoint_url:...}} instead of AWS_ENDPOINT_URL."""
    import fsspec
    from hydra.utils import instantiate

    from imcap.config_compose import compose_config

    write_shards(_records(tmp_path, 2), "s3://shards/options/train", shard_size=2)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setattr(fsspec.config, "conf", {})
    monkeypatch.setenv("IMCAP_ROOT", str(tmp_path))
    monkeypatch.delenv("IMCAP_DATA_DIR", raising=False)
    cfg = compose_config("train", ["data=shards", "data.root=s3://shards/options",  # the guide's override
                                   f'data.storage_options={{s3:{{endpoint_url:"{s3["AWS_ENDPOINT_URL"]}"}}}}'])
    assert instantiate(cfg.data).cache_dir == str(tmp_path / "data" / "shard-cache")  # remote: local disk by default
    assert fsspec.config.conf["s3"]["endpoint_url"] == s3["AWS_ENDPOINT_URL"]
    fsspec.AbstractFileSystem.clear_instance_cache()
    found = expand_shards("s3://shards/options", "train/*.tar")
    assert found == ["s3://shards/options/train/000000.tar"]
    assert [s.image_id for s in load_index(found[0], tmp_path / "cache")] == [0, 1]


def test_writing_shards_to_a_web_server_is_a_one_line_error(tmp_path):
    done = run(sys.executable, "-m", "imcap.data", "shards", "out=https://user:pa55word@example.org/shards", cwd=tmp_path)
    assert_one_line_error(done, "error: cannot write shards to https://example.org/shards: web servers are read from "
                                "only; write them to a folder or a bucket (s3://, gs://)")
    assert "pa55word" not in done.stdout + done.stderr
