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
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from webdataset import ShardWriter
from webdataset.tariterators import base_plus_ext

from imcap.data.records import CaptionRecord
from imcap.data.sources.policy import check_choice
from imcap.errors import ImcapError
from imcap.files import write_json

log = logging.getLogger(__name__)

INDEX_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BAD_SAMPLES = ("error", "skip")
HEADER_BYTES = 1 << 16  # enough of an image for PIL to read its header (format, size)


# -- writing -------------------------------------------------------------------------------------
def write_shards(records: Iterable[CaptionRecord], folder: str | Path, shard_size: int) -> list[str]:
    """Write `records` as shards of `shard_size` samples, `folder/000000.tar` ...; returns the
    shard paths. Image files are copied byte for byte (their extension names the member)."""
    if shard_size < 1:
        raise ImcapError(f"shard_size={shard_size}; use a count of samples per shard >= 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with ShardWriter(str(folder / "%06d.tar"), maxcount=shard_size, verbose=0,
                     post=lambda name: written.append(name)) as sink:
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
    return sorted(str(Path(p)) for p in written) or []


# -- indexing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    key: str
    image_id: str | int
    captions: tuple[str, ...]
    image: tuple[int, int] | None  # byte offset and size of the image member
    problem: str | None  # why the sample cannot be used, None if it can


def _captions(txt: bytes | None, meta: dict[str, Any]) -> tuple[str, ...]:
    """A json `captions` list, else the txt lines, else a json `caption` (img2dataset)."""
    if isinstance(meta.get("captions"), list):
        found = [str(c) for c in meta["captions"]]
    elif txt is not None:
        found = txt.decode("utf-8", errors="replace").splitlines()
    else:
        found = [str(meta["caption"])] if meta.get("caption") is not None else []
    return tuple(c.strip() for c in found if c.strip())


def _image_problem(head: bytes) -> str | None:
    """Why the image whose first bytes are `head` cannot be used, from its header alone."""
    try:
        with Image.open(io.BytesIO(head)):
            return None
    except Image.DecompressionBombError:  # over PIL's pixel limit: would ask for gigabytes
        return "image too large"
    except (UnidentifiedImageError, OSError, ValueError):
        return "not an image"


def _read_samples(path: Path) -> list[Sample]:
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
        with tarfile.open(path, "r:") as f:
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
        raise ImcapError(f"shard {path} is not a readable tar file ({e}); rewrite or remove it") from e
    return samples


def index_path(shard: str | Path, cache_dir: str | Path | None) -> Path:
    """Where the index (and, beside it, the feature cache) of `shard` lives: next to it, or
    with `cache_dir` under cache_dir/<the shard's absolute folder>."""
    shard = Path(shard).resolve()
    folder = shard.parent if cache_dir is None else Path(cache_dir) / str(shard.parent).lstrip("/")
    return folder / f"{shard.stem}.index.json"


def _stamp(shard: Path) -> dict[str, int]:
    st = shard.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_index(shard: str | Path, cache_dir: str | Path | None = None) -> list[Sample]:
    """The samples of `shard`, from its cached index or by indexing it now (one process at a
    time per shard: DDP ranks wait for the first and read its index)."""
    shard = Path(shard)
    if not shard.is_file():
        raise ImcapError(f"shard not found: {shard}; check data.root and data.train/val/test")
    path = index_path(shard, cache_dir)
    cached = _read_index(path, shard)
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
        cached = _read_index(path, shard)
        if cached is not None:
            return cached
        samples = _read_samples(shard)
        write_json(path, {"version": INDEX_VERSION, "shard": _stamp(shard),
                          "samples": [[s.key, s.image_id, list(s.captions), s.image, s.problem] for s in samples]},
                   indent=None)
    return samples


def _read_index(path: Path, shard: Path) -> list[Sample] | None:
    """The cached index if it was made from this very shard file (same size and mtime)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("version") != INDEX_VERSION or data.get("shard") != _stamp(shard):
        return None
    return [Sample(k, i, tuple(c), tuple(im) if im else None, p) for k, i, c, im, p in data["samples"]]


def usable(samples_by_shard: Sequence[tuple[str, Sequence[Sample]]], policy: str, split: str) -> None:
    """Apply `data.bad_samples` to indexed shards: stop on the first bad sample, or report
    how many are skipped (by reason, with the first one)."""
    check_choice(policy, BAD_SAMPLES, "data.bad_samples")
    bad = [(shard, s) for shard, samples in samples_by_shard for s in samples if s.problem]
    if not bad:
        return
    shard, first = bad[0]
    if policy == "error":
        raise ImcapError(f"{len(bad)} {split} samples cannot be used (first: key {first.key} in {shard}: "
                         f"{first.problem}); fix the shards or set data.bad_samples=skip")
    total = sum(len(samples) for _, samples in samples_by_shard)
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(Counter(s.problem for _, s in bad).items()))
    log.warning("Skipped %d of %d %s samples (%s; first: key %s in %s)", len(bad), total, split, reasons,
                first.key, shard)


def read_image_bytes(shard: str | Path, sample: Sample) -> bytes:
    """The image file of `sample`, read directly at its offset in the shard."""
    assert sample.image is not None
    offset, size = sample.image
    with open(shard, "rb") as f:
        f.seek(offset)
        return f.read(size)
