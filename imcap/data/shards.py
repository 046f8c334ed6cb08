"""Tar shards in img2dataset's WebDataset layout: writing them, and indexing them for reading.

A shard is a tar file of samples whose members share a key: `KEY.jpg` (or .png/.webp), and
captions in `KEY.txt` (one per line) and/or `KEY.json` (`captions`: a list, or img2dataset's
single `caption`). imcap writes both, plus `image_id` in the json.

Reading starts with an index per shard, built once by one pass over the tar headers (image
data is seeked over, only its first bytes are checked) and cached as `NAME.index.json` next to
the shard (or under a cache folder mirroring the shards' absolute path): per sample its key,
image id, captions, and the byte offset and size of its image. With it a reader opens any
sample directly, which is what makes sharding by sample, shuffling and mid-epoch resume cheap.
Samples without an image, without captions, or whose image is not one are bad samples:
`bad_samples=error` stops, `skip` leaves them out and reports how many.

Shards can live in object storage: any fsspec URL (`s3://`, `gs://`, `https://`; `file://` and
plain paths are local). Writing stages one shard at a time on local disk and uploads it with its
index beside it (`NAME.index.json`). Reading fetches each image by a byte-range request; the
index is read once from beside the shard (or built by one streamed pass) and kept on local disk
under data.cache_dir, mirroring the URL (`CACHE/s3/BUCKET/PATH/NAME.index.json`). Credentials
come the store's standard way (for S3: AWS_* variables, ~/.aws/config, AWS_ENDPOINT_URL),
never from imcap's config or logs. When a bucket yields nothing, its errors name the endpoint
that answered (never a key, nor a user:password@ in its URL) and whether the bucket is there.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import io
import json
import logging
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import fsspec
from PIL import Image
from webdataset import ShardWriter
from webdataset.tariterators import base_plus_ext

from imcap.atomic_files import write_json
from imcap.data.images import DAMAGED, check_pixels, pixel_limit
from imcap.data.records import CaptionRecord
from imcap.data.sources.validation import check_choice
from imcap.data.tokenizer import normalize
from imcap.errors import ImcapError

log = logging.getLogger(__name__)

INDEX_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BAD_SAMPLES = ("error", "skip")
HEADER_BYTES = 1 << 16  # enough of an image for PIL to read its header (format, size)
# an unreachable endpoint is an error in seconds (a refused connection: 3 s), not after retries for minutes
S3_DEFAULTS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                 "retries": {"max_attempts": 2, "mode": "standard"}}}
# The first request to an S3 store waits this many seconds for an answer, once, with no retry:
# an endpoint that accepts connections but never answers (a wrong port behind a proxy, a hung
# server) is an error in seconds, not after each call's retries time out for minutes
FIRST_CONTACT_TIMEOUT = 5
_ANSWERED: set[tuple[str, str]] = set()  # the (protocol, bucket)s that answered in this process


# -- where shards are: local paths or fsspec URLs -------------------------------------------------
def local_path(location: str | Path) -> str | None:
    """The local path of `location` (a path or a file:// URL), None for a remote URL."""
    text = str(location)
    if text.startswith("file://"):
        return text[len("file://"):]
    return None if "://" in text else text


def shown(url: str | Path) -> str:
    """`url` as it may be printed: without the user:password@ some https URLs carry."""
    parts = urlsplit(str(url))
    if parts.scheme and "@" in parts.netloc:
        return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
    return str(url)


def join(root: str | Path, relative: str) -> str:
    """`relative` under `root`; an absolute path or a URL stays as it is."""
    if "://" in relative or Path(relative).is_absolute():
        return relative
    if local_path(root) is not None:
        return str(Path(local_path(root)) / relative)
    return str(root).rstrip("/") + "/" + relative


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of a remote `url` and the path within it. Options come from
    fsspec's config (data.storage_options, FSSPEC_<PROTOCOL>_* variables) and the store's own
    credential chain; S3 gets short timeouts unless they are configured."""
    protocol = url.split("://", 1)[0]
    for chatty in ("botocore", "aiobotocore"):  # INFO lines ("Found credentials in ...") in every rank's log
        if not logging.getLogger(chatty).level:
            logging.getLogger(chatty).setLevel(logging.WARNING)
    configured = fsspec.config.conf.get(protocol, {})
    options = {k: v for k, v in S3_DEFAULTS.items() if k not in configured} if protocol in ("s3", "s3a") else {}
    try:
        found = fsspec.core.url_to_fs(url, **options)
        if protocol in ("s3", "s3a"):
            check_answers(url, configured)
        return found
    except ImportError as e:
        raise ImcapError(f"{protocol}:// URLs need fsspec's {protocol} filesystem ({e}); install it, e.g. "
                         f"pip install {'gcsfs' if protocol in ('gs', 'gcs') else 's3fs'}") from e
    except ValueError as e:
        raise ImcapError(f"{shown(url)}: {e}; use a local path or an fsspec URL (s3://, gs://, https://)") from e


def check_answers(url: str, configured: dict[str, Any]) -> None:
    """One quick request to the S3 store of `url` (its object's metadata), the first time this
    process uses that bucket: an ImcapError when it times out. Whatever else the request meets
    (a missing object, no access, a refused connection) is left to the real request to report."""
    protocol, bucket = url.split("://", 1)[0], urlsplit(url).netloc
    if (protocol, bucket) in _ANSWERED:
        return
    config = {**configured.get("config_kwargs", {}), "connect_timeout": FIRST_CONTACT_TIMEOUT,
              "read_timeout": FIRST_CONTACT_TIMEOUT, "retries": {"max_attempts": 1}}
    probe, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, config_kwargs=config)
    probe.retries = 1  # s3fs retries a timed-out call 5 times on top of botocore's attempts
    try:
        probe.info(path)
    except Exception as e:  # noqa: BLE001 - only a silent endpoint is this check's to report
        if type(e).__name__ in ("ReadTimeoutError", "ReadTimeout") or isinstance(e, TimeoutError):
            raise ImcapError(f"cannot reach {shown(url)}: its endpoint {endpoint_of(probe)} accepted the connection "
                             f"but did not answer within {FIRST_CONTACT_TIMEOUT} s; check the endpoint (for S3: "
                             "AWS_ENDPOINT_URL) and the network") from e
    _ANSWERED.add((protocol, bucket))


# the packages whose exceptions mean the store could not be reached or answered
STORE_PACKAGES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "fsspec", "requests", "urllib3")


def from_store(e: BaseException) -> bool:
    return isinstance(e, (OSError, TimeoutError)) or type(e).__module__.split(".")[0] in STORE_PACKAGES


@contextlib.contextmanager
def storage_errors(url: str | Path, what: str):
    """Errors of the store as one `error:` line naming `url` (never its credentials)."""
    try:
        yield
    except (ImcapError, tarfile.TarError, EOFError):  # not the store's: the caller names them
        raise
    except FileNotFoundError as e:
        parts = urlsplit(str(url))  # in a bucket: a 404 may be the bucket's or the endpoint's, not the object's
        answer = None
        if parts.scheme in S3_PROTOCOLS and what != "bucket":
            with contextlib.suppress(ImcapError):  # the bucket cannot be asked: the object's own error stands
                answer = ask_bucket(f"{parts.scheme}://{parts.netloc}", top_level=False)
        if answer is not None and answer.kind in ("no bucket", "not s3"):
            raise ImcapError(f"{what} not found: {shown(url)}: {answer.text}; check the bucket in data.root, and the "
                             "endpoint (AWS_ENDPOINT_URL, or data.storage_options={s3:{endpoint_url:URL}})") from e
        raise ImcapError(f"{what} not found: {shown(url)}; check data.root and data.train/val/test") from e
    except PermissionError as e:
        raise ImcapError(f"no access to {shown(url)} ({type(e).__name__}); check the store's credentials "
                         "(for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/config)") from e
    except Exception as e:
        if not from_store(e):
            raise  # a bug, not the store: its traceback
        if local_path(url) is not None:
            raise ImcapError(f"cannot read {what} {url}: {getattr(e, 'strerror', None) or e}") from e
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ImcapError(f"cannot reach {shown(url)}{_at_endpoint(url)} ({reason}); check the endpoint (for S3: "
                         "AWS_ENDPOINT_URL), the network and the credentials") from e


# -- what an S3 store answers when nothing is found: which endpoint, and whether the bucket is there --
S3_PROTOCOLS = ("s3", "s3a")
NAMES_SHOWN = 5  # what a bucket holds, a few names: one listing request


@dataclass(frozen=True)
class BucketAnswer:
    """What an S3 endpoint answered to a listing: `kind` is "no bucket" (not at that endpoint),
    "not s3" (an answer with no S3 error or listing: a web server, a proxy), "holds" or "nothing"
    (the bucket is there, with or without names under the folder); `text` says it, naming the
    endpoint."""

    kind: str
    text: str


class _NotThere(Exception):
    def __init__(self, answer: BucketAnswer):
        super().__init__(answer.text)
        self.answer = answer


def endpoint_of(fs: Any) -> str:
    """The endpoint an S3 filesystem sends its requests to, however it was given (AWS_ENDPOINT_URL,
    ~/.aws/config, data.storage_options, FSSPEC_S3_ENDPOINT_URL, AWS's own), without user:password@."""
    fs.connect()
    return shown(fs.s3.meta.endpoint_url)


def _list(fs: Any, bucket: str, prefix: str, delimiter: str = "") -> tuple[list[str], bool]:
    """A few names under `prefix` in `bucket` (relative to it) and whether there are more. _NotThere
    when the bucket is not at the endpoint, or the endpoint answers with no S3 error or listing
    (botocore then names an error by its HTTP status, and parses a web page as an empty answer);
    other failures as they come."""
    try:
        answer = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=NAMES_SHOWN,
                            **({"Delimiter": delimiter} if delimiter else {}))
    except OSError as e:  # s3fs's translation of the answer: its cause holds the S3 error code
        code = str((getattr(e.__cause__, "response", None) or {}).get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            raise _NotThere(BucketAnswer("no bucket", f"the bucket {bucket} does not exist at {endpoint_of(fs)}")) from e
        if code.isdigit():
            raise _NotThere(_not_s3(fs, bucket, code, "error")) from e
        raise
    if answer.get("Name") != bucket:  # every S3 listing names its bucket
        raise _NotThere(_not_s3(fs, bucket, answer.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"), "listing"))
    names = [p["Prefix"] for p in answer.get("CommonPrefixes", [])] + [o["Key"] for o in answer.get("Contents", [])]
    return sorted(n[len(prefix):] for n in names), bool(answer.get("IsTruncated"))


def _not_s3(fs: Any, bucket: str, status: str | int, missing: str) -> BucketAnswer:
    return BucketAnswer("not s3", f"{endpoint_of(fs)} answered HTTP {status} to a listing of the bucket {bucket}, with "
                                  f"no S3 {missing}: it is not an S3 endpoint (a web server, a proxy, or a wrong path in "
                                  "its URL)")


def _some(names: list[str], more: bool) -> str:
    return ", ".join(names) + (", ..." if more else "")


def ask_bucket(folder: str, top_level: bool = True) -> BucketAnswer | None:
    """What the S3 store of `folder` holds there, by one listing (with `top_level`, a second when
    nothing is under the folder, to name what the bucket holds at its top); None for other stores.
    A listing that fails otherwise (no access, no connection) is an ImcapError saying so."""
    if folder.split("://", 1)[0] not in S3_PROTOCOLS:
        return None
    fs, _ = filesystem(folder)
    parts = urlsplit(folder)
    bucket, prefix = parts.netloc, parts.path.strip("/") + "/" if parts.path.strip("/") else ""
    try:
        with storage_errors(folder, "bucket"):
            under = _list(fs, bucket, prefix)
            top = _list(fs, bucket, "", "/") if top_level and under == ([], False) and prefix else None
    except _NotThere as e:
        return e.answer
    where = f"the bucket {bucket} at {endpoint_of(fs)}"
    if under[0]:
        return BucketAnswer("holds", f"{where} holds under {prefix or '/'}: {_some(*under)}")
    if not prefix:
        return BucketAnswer("nothing", f"{where} is empty")
    there = f" (at its top: {_some(*top)})" if top and top[0] else ""
    return BucketAnswer("nothing", f"{where} holds nothing under {prefix}{there}")


def _at_endpoint(url: str | Path) -> str:
    """" at ENDPOINT" for an S3 `url`, "" for other stores or when it cannot be told."""
    if str(url).split("://", 1)[0] not in S3_PROTOCOLS:
        return ""
    try:
        return f" at {endpoint_of(filesystem(str(url))[0])}"
    except Exception:  # noqa: BLE001 - the error being reported is the one that matters
        return ""


def glob_shards(pattern: str) -> list[str]:
    """Shards matching a glob `pattern`, a local path or a URL of a store that lists."""
    if local_path(pattern) is not None:
        return sorted(glob.glob(local_path(pattern)))
    fs, path = filesystem(pattern)
    with storage_errors(pattern, "shards"):
        found = fs.glob(path, detail=True)
    urls = []
    for name, info in found.items():
        if info.get("type") != "directory":
            urls.append(fs.unstrip_protocol(name))
            _REMOTE_STAMPS.setdefault(urls[-1], _stamp_of(info))  # one listing instead of a request per shard
    return sorted(urls)


def _put(local: str, url: str) -> None:
    fs, path = filesystem(url)
    with storage_errors(url, "shard folder"):
        fs.put_file(local, path)
        fs.invalidate_cache(path)


# -- writing -------------------------------------------------------------------------------------
def write_shards(records: Iterable[CaptionRecord], folder: str | Path, shard_size: int) -> list[str]:
    """Write `records` as shards of `shard_size` samples, `folder/000000.tar` ...; returns the
    shard paths (URLs for a remote `folder`). Image files are copied byte for byte (their
    extension names the member). A remote shard is staged on local disk (one at a time, in the
    temporary folder), indexed, and uploaded with its index."""
    if shard_size < 1:
        raise ImcapError(f"shard_size={shard_size}; use a count of samples per shard >= 1")
    check_writable(folder)
    if local_path(folder) is not None:
        target = Path(local_path(folder))
        target.mkdir(parents=True, exist_ok=True)
        return _write_tars(records, target, shard_size, lambda name: str(Path(name)))
    with tempfile.TemporaryDirectory(prefix="imcap-shards-") as staging:
        return _write_tars(records, Path(staging), shard_size, lambda name: _upload(name, str(folder)))


def check_writable(folder: str | Path) -> None:
    """Shards can be written to a folder or a bucket; a web server is only read from. A bucket
    must be at its endpoint: asked before any shard is made, rather than at the first upload."""
    if str(folder).split("://", 1)[0] in ("http", "https"):
        raise ImcapError(f"cannot write shards to {shown(folder)}: web servers are read from only; write them to a "
                         "folder or a bucket (s3://, gs://) and serve that")
    try:
        answer = ask_bucket(str(folder), top_level=False)
    except ImcapError as e:
        if not isinstance(e.__cause__, PermissionError):
            raise
        answer = None  # credentials that may write but not list: the first upload tells
    endpoint = "AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL"
    if answer is not None and answer.kind == "no bucket":
        raise ImcapError(f"cannot write shards to {shown(folder)}: {answer.text}; create it, or check the bucket in "
                         f"out= and the endpoint ({endpoint})")
    if answer is not None and answer.kind == "not s3":
        raise ImcapError(f"cannot write shards to {shown(folder)}: {answer.text}; check the endpoint ({endpoint})")


def _upload(staged: str, folder: str) -> str:
    """Upload a staged shard and its index into `folder`; returns the shard's URL."""
    url = join(folder, Path(staged).name)
    samples = _read_samples(staged, staged)
    _put(staged, url)
    index = Path(staged).with_suffix(".index.json")
    write_json(index, _index_json(remote_stamp(url), samples), indent=None)
    _put(str(index), sidecar(url))
    for done in (staged, index):
        os.unlink(done)
    return url


def _write_tars(records: Iterable[CaptionRecord], folder: Path, shard_size: int, post) -> list[str]:
    written: list[str] = []
    with ShardWriter(str(folder / "%06d.tar"), maxcount=shard_size, verbose=0,
                     post=lambda name: written.append(post(name))) as sink:
        for n, record in enumerate(records):
            ext = Path(record.image_path).suffix.lower().lstrip(".")
            if ext not in IMAGE_EXTENSIONS:
                raise ImcapError(f"image {record.image_path} is not one of {IMAGE_EXTENSIONS}; convert it first")
            try:
                image = Path(record.image_path).read_bytes()
            except OSError as e:
                raise ImcapError(f"cannot read image {record.image_path}: {e.strerror}") from e
            meta = {"image_id": record.image_id, "captions": list(record.captions)}
            sink.write({"__key__": f"{n:09d}", ext: image, "txt": "\n".join(record.captions),
                        "json": json.dumps(meta, ensure_ascii=False)})
    return sorted(written)


# -- indexing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    key: str
    image_id: str | int
    captions: tuple[str, ...]
    image: tuple[int, int] | None  # byte offset and size of the image member
    problem: str | None  # why the sample cannot be used, None if it can


def _captions(txt: bytes | None, meta: dict[str, Any]) -> tuple[str, ...]:
    """A json `captions` list, else the txt lines, else a json `caption` (img2dataset); those with
    no words once normalised (only punctuation or emoji) left out, as `keep_existing` does."""
    if isinstance(meta.get("captions"), list):
        found = [str(c) for c in meta["captions"]]
    elif txt is not None:
        found = txt.decode("utf-8", errors="replace").splitlines()
    else:
        found = [str(meta["caption"])] if meta.get("caption") is not None else []
    return tuple(c.strip() for c in found if normalize(c))


def _image_problem(head: bytes) -> str | None:
    """Why the image whose first bytes are `head` cannot be used, from its header alone."""
    try:
        with pixel_limit(), Image.open(io.BytesIO(head)) as im:
            check_pixels(im)
            return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # over PIL's limit: gigabytes
        return "image too large"
    except DAMAGED:  # UnidentifiedImageError is an OSError
        return "not an image"


def open_shard(shard: str | Path) -> IO[bytes]:
    """`shard` opened for reading: a local file, or a remote object read ahead in large blocks
    (an index pass reads it front to back)."""
    if local_path(shard) is not None:
        return open(local_path(shard), "rb")
    fs, path = filesystem(str(shard))
    return fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")


def _read_samples(path: str | Path, source: str | Path) -> list[Sample]:
    """Index the shard `path` (named so in errors), read from `source` (a path or URL)."""
    samples: list[Sample] = []
    members: dict[str, tarfile.TarInfo] = {}
    key: str | None = None

    def close(f) -> None:
        if key is None:
            return
        txt = f.extractfile(members["txt"]).read() if "txt" in members else None
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(f.extractfile(members["json"]).read())
            except ValueError:
                meta = {}
        captions = _captions(txt, meta if isinstance(meta, dict) else {})
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        problem = None
        if image is None:
            problem = "no image"
        elif not captions:
            problem = "no captions"
        else:
            f.fileobj.seek(image.offset_data)
            problem = _image_problem(f.fileobj.read(min(image.size, HEADER_BYTES)))
        samples.append(Sample(key, meta.get("image_id", key) if isinstance(meta, dict) else key, captions,
                              (image.offset_data, image.size) if image is not None else None, problem))

    try:
        with storage_errors(source, "shard"), open_shard(source) as raw, tarfile.open(fileobj=raw, mode="r:") as f:
            for info in f:  # headers only: the data of each member is seeked over
                if not info.isfile():
                    continue
                split = base_plus_ext(info.name)
                if split is None or split[0] is None:
                    continue
                base, ext = split
                if base != key:
                    close(f)
                    key, members = base, {}
                members[ext.lower()] = info
            close(f)
    except (tarfile.TarError, EOFError) as e:
        raise ImcapError(f"shard {shown(path)} is not a readable tar file ({e}); rewrite or remove it") from e
    return samples


def index_path(shard: str | Path, cache_dir: str | Path | None) -> Path:
    """Where the index (and, beside it, the feature cache) of `shard` lives: next to a local
    shard, or with `cache_dir` under cache_dir/<the shard's absolute folder>; a remote shard's
    under cache_dir/<protocol>/<host>/<path> (it needs a cache_dir)."""
    local = local_path(shard)
    if local is not None:
        shard = Path(local).resolve()
        folder = shard.parent if cache_dir is None else Path(cache_dir) / str(shard.parent).lstrip("/")
        return folder / f"{shard.stem}.index.json"
    if cache_dir is None:
        raise ImcapError(f"shards in object storage ({shown(shard)}) need a local folder for their indexes and "
                         "features; set data.cache_dir=DIR")
    parts = urlsplit(shown(shard))
    host = parts.netloc.replace(":", "_") or "_"
    remote = Path(parts.path.lstrip("/"))
    return Path(cache_dir) / parts.scheme / host / remote.parent / f"{remote.stem}.index.json"


_REMOTE_STAMPS: dict[str, dict[str, Any]] = {}  # a run reads each object's stamp once (workers inherit it)


def remote_stamp(url: str) -> dict[str, Any]:
    """Size and version tag (ETag, else the modification time) of the object at `url`."""
    if url not in _REMOTE_STAMPS:
        fs, path = filesystem(url)
        with storage_errors(url, "shard"):
            info = fs.info(path)
        if info.get("type") == "directory":
            raise ImcapError(f"shard not found: {shown(url)} is a folder; check data.root and data.train/val/test")
        _REMOTE_STAMPS[url] = _stamp_of(info)
    return _REMOTE_STAMPS[url]


def _stamp_of(info: dict[str, Any]) -> dict[str, Any]:
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "LastModified", "mtime", "updated") if info.get(k)), "")
    return {"bytes": int(info.get("size") or 0), "version": str(tag)}


def stamp(shard: str | Path) -> dict[str, Any]:
    """What identifies this very shard file: size and mtime (local), size and ETag (remote)."""
    local = local_path(shard)
    if local is None:
        return remote_stamp(str(shard))
    try:
        st = os.stat(local)
    except FileNotFoundError:
        raise ImcapError(f"shard not found: {shard}; check data.root and data.train/val/test") from None
    if not Path(local).is_file():
        raise ImcapError(f"shard not found: {shard}; check data.root and data.train/val/test")
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _index_json(shard_stamp: dict[str, Any], samples: Sequence[Sample]) -> dict[str, Any]:
    return {"version": INDEX_VERSION, "shard": shard_stamp,
            "samples": [[s.key, s.image_id, list(s.captions), s.image, s.problem] for s in samples]}


def load_index(shard: str | Path, cache_dir: str | Path | None = None) -> list[Sample]:
    """The samples of `shard`, from its cached index or by indexing it now (one process at a
    time per shard: DDP ranks wait for the first and read its index). A remote shard's index
    is copied from beside it when it is there and made from this very object."""
    this = stamp(shard)
    path = index_path(shard, cache_dir)
    cached = _read_index(path, this)
    if cached is not None:
        return cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w", encoding="utf-8")
    except OSError as e:
        raise ImcapError(f"cannot write the shard index {path} ({e.strerror}); set "
                         "data.cache_dir=A_WRITABLE_DIR") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_index(path, this)
        if cached is not None:
            return cached
        data = _remote_index(str(shard), this) if local_path(shard) is None else None
        if data is None:
            data = _index_json(this, _read_samples(shard, shard))
        write_json(path, data, indent=None)
    return _samples_of(data)


def sidecar(shard: str) -> str:
    """The index beside a shard in its store: NAME.index.json next to NAME.tar."""
    return (shard[: -len(".tar")] if shard.endswith(".tar") else shard) + ".index.json"


def _remote_index(url: str, this: dict[str, Any]) -> dict[str, Any] | None:
    """The index written beside a remote shard, if it was made from this very object."""
    fs, path = filesystem(url)
    try:
        data = json.loads(fs.cat_file(sidecar(path)))
    except Exception as e:  # no index beside it (img2dataset's shards): index the shard itself
        if from_store(e) or isinstance(e, ValueError):
            return None
        raise
    ok = isinstance(data, dict) and data.get("version") == INDEX_VERSION and data.get("shard") == this
    return data if ok else None


def _samples_of(data: dict[str, Any]) -> list[Sample]:
    return [Sample(k, i, tuple(c), tuple(im) if im else None, p) for k, i, c, im, p in data["samples"]]


def _read_index(path: Path, this: dict[str, Any]) -> list[Sample] | None:
    """The cached index if it was made from this very shard file (same size and mtime or ETag)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("version") != INDEX_VERSION or data.get("shard") != this:
        return None
    return _samples_of(data)


def usable(samples_by_shard: Sequence[tuple[str, Sequence[Sample]]], policy: str, split: str) -> None:
    """Apply `data.bad_samples` to indexed shards: stop on the first bad sample, or report
    how many are skipped (by reason, with the first one)."""
    check_choice(policy, BAD_SAMPLES, "data.bad_samples")
    bad = [(shard, s) for shard, samples in samples_by_shard for s in samples if s.problem]
    if not bad:
        return
    shard, first = bad[0]
    if policy == "error":
        raise ImcapError(f"{len(bad)} {split} samples cannot be used (first: key {first.key} in {shown(shard)}: "
                         f"{first.problem}); fix the shards or set data.bad_samples=skip")
    total = sum(len(samples) for _, samples in samples_by_shard)
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(Counter(s.problem for _, s in bad).items()))
    log.warning("Skipped %d of %d %s samples (%s; first: key %s in %s)", len(bad), total, split, reasons,
                first.key, shown(shard))


def read_image_bytes(shard: str | Path, sample: Sample) -> bytes:
    """The image file of `sample`, read directly at its offset in the shard (one byte-range
    request for a remote shard)."""
    assert sample.image is not None
    offset, size = sample.image
    local = local_path(shard)
    if local is not None:
        with open(local, "rb") as f:
            f.seek(offset)
            return f.read(size)
    fs, path = filesystem(str(shard))
    with storage_errors(shard, "shard"):
        return fs.cat_file(path, start=offset, end=offset + size)


def read_images(located: Sequence[tuple[str, Sample]]) -> list[bytes]:
    """The image files of (shard, sample) pairs, in order. A store's are fetched together, by
    concurrent range requests (one round trip per batch rather than one per image)."""
    out: list[bytes | None] = [None] * len(located)
    by_protocol: dict[str, list[int]] = {}
    for i, (shard, sample) in enumerate(located):
        if local_path(shard) is not None:
            out[i] = read_image_bytes(shard, sample)
        else:
            by_protocol.setdefault(str(shard).split("://", 1)[0], []).append(i)
    for wanted in by_protocol.values():
        fs, _ = filesystem(located[wanted[0]][0])
        paths = [filesystem(located[i][0])[1] for i in wanted]
        starts = [located[i][1].image[0] for i in wanted]
        ends = [start + located[i][1].image[1] for start, i in zip(starts, wanted)]
        with storage_errors(located[wanted[0]][0], "shard"):
            for i, data in zip(wanted, fs.cat_ranges(paths, starts, ends, on_error="raise")):
                out[i] = data
    return out


@contextlib.contextmanager
def local_copy(shard: str | Path, folder: Path):
    """A local path holding `shard`: the shard itself, or a remote one downloaded into
    `folder` for the duration (one pass over every image reads it whole)."""
    if local_path(shard) is not None:
        yield local_path(shard)
        return
    fs, path = filesystem(str(shard))
    folder.mkdir(parents=True, exist_ok=True)
    fd, copy = tempfile.mkstemp(prefix=f"{Path(path).stem}.", suffix=".download.tar", dir=folder)
    os.close(fd)
    try:
        with storage_errors(shard, "shard"):
            fs.get_file(path, copy)
        yield copy
    finally:
        os.unlink(copy)
