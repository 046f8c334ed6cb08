"""Per-shard grid-feature cache: a frozen encoder runs once per shard image, and streaming runs
read memory-mapped features instead of decoding JPEGs and running the CNN every epoch.

`NAME.features-KEY.npy` (rows = the shard's sample positions, (n, N, C)) and
`NAME.features-KEY.json` (the positions whose image would not decode) sit beside the shard's
index: next to the shard, or under data.cache_dir. KEY hashes the encoder fingerprint, the
storage dtype, the precision and the shard file's size and mtime (size and ETag for a shard in
object storage, which is downloaded beside its feature file for the one pass that extracts it
and removed after: local disk holds the features, plus one shard per process). Each process starts at a
different shard (`first`, its rank) and takes a lock per shard, so DDP ranks and nodes on
shared storage split the work and then read each other's files. A process waiting for a shard's
lock says so and gives up, as `imcap.data.features` does, after `IMCAP_FEATURE_LOCK_TIMEOUT`
seconds (default 900) in which the holder's `NAME.features-KEY.progress` did not change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from imcap.atomic_files import write_json
from imcap.data.features import PRECISIONS, _to_numpy, inference_encoder, wait_for_lock
from imcap.data.images import PIXELS_VERSION, accepts_uint8_tensor
from imcap.data.shard_split import ShardSplit, decode_image
from imcap.data.shards import (
    Sample,
    index_path,
    load_index,
    local_copy,
    read_image_bytes,
    shown,
    stamp,
)
from imcap.errors import ImcapError

log = logging.getLogger(__name__)


def feature_path(shard: str, cache_dir: str | None, fingerprint: str, dtype: str, precision: str) -> Path:
    this = stamp(shard)  # size and mtime of a local shard, size and ETag of a remote one
    version = this.get("mtime_ns", this.get("version"))
    # "rows": the file holds encoder.encode_for_cache's rows (files keyed without it held the grid alone);
    # PIXELS_VERSION: how the images became pixels (files read another way are not reused)
    key = hashlib.sha256(f"{fingerprint}\0{dtype}\0{precision}\0{this['bytes']}\0{version}\0rows\0{PIXELS_VERSION}".encode()).hexdigest()[:16]
    index = index_path(shard, cache_dir)
    return index.with_name(f"{index.name.removesuffix('.index.json')}.features-{key}.npy")


def extract_shard_features(encoder: torch.nn.Module, split: ShardSplit, transform: Callable, cache_dir: str | None,
                           fingerprint: str, batch_size: int = 64, precision: str = "fp32", policy: str = "error",
                           first: int = 0, dtype: str = "float16", lock_timeout: float | None = None) -> list[str]:
    """The feature file of every shard of `split` (extracted where missing). Images that fail
    to decode stop with a one-line error (policy error) or are left out of `split` and
    reported (skip). `lock_timeout`: seconds to wait without progress for another process
    extracting the same shard (`imcap.data.features.wait_for_lock`)."""
    paths = [feature_path(s, cache_dir, fingerprint, dtype, precision) for s in split.shards]
    n = len(paths)
    skipped = 0
    for i in [(first + k) % n for k in range(n)]:
        bad = _ensure(encoder, split.shards[i], paths[i], transform, cache_dir, batch_size, precision, policy, dtype,
                      lock_timeout)
        if bad:
            split.drop(i, bad)
            skipped += len(bad)
    if skipped:
        log.warning("Skipped %d %s images that would not decode (data.bad_samples=skip)", skipped, split.name)
    return [str(p) for p in paths]


def _ensure(encoder, shard: str, path: Path, transform, cache_dir, batch_size, precision, policy, dtype,
            lock_timeout: float | None = None) -> list[int]:
    bad_file = path.with_suffix(".json")
    if path.is_file() and bad_file.is_file():
        return json.loads(bad_file.read_text(encoding="utf-8"))["bad"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w", encoding="utf-8") as lock:
        wait_for_lock(lock, progress_path(path), f"shard {shown(shard)}", lock_timeout)
        if path.is_file() and bad_file.is_file():
            return json.loads(bad_file.read_text(encoding="utf-8"))["bad"]
        samples = load_index(shard, cache_dir)
        with local_copy(shard, path.parent) as source:  # a remote shard: downloaded once, removed after
            bad = _extract(encoder, shard, source, samples, path, transform, batch_size, precision, policy, dtype)
        write_json(bad_file, {"bad": bad}, indent=None)  # whole or absent: other ranks read it without the lock
    return bad


def progress_path(path: Path) -> Path:
    """Touched after every batch the extractor of `path` stores: waiters see it move."""
    return path.with_suffix(".progress")


def _extract(encoder, shard: str, source: str, samples: list[Sample], path: Path, transform, batch_size: int, precision: str,
             policy: str, dtype: str) -> list[int]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    was_training = encoder.training
    model = inference_encoder(encoder, precision, device)
    in_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=in_dtype != PRECISIONS[precision])
    rows = max(1, 16 // in_dtype.itemsize) if device.type == "cpu" else batch_size  # as imcap.data.features
    as_tensor = accepts_uint8_tensor(transform)
    bad: list[int] = []

    def load(i: int) -> torch.Tensor | None:
        where = f"key {samples[i].key} in {shown(shard)}"
        try:
            return transform(decode_image(read_image_bytes(source, samples[i]), where, as_tensor))
        except ImcapError:
            if policy == "error":
                raise
            bad.append(i)
            return None

    todo = [i for i, s in enumerate(samples) if not s.problem]
    store = None
    partial = path.with_suffix(f".partial{os.getpid()}.npy")
    try:
        with torch.inference_mode(), autocast, ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            for start in range(0, len(todo), batch_size):
                part = todo[start:start + batch_size]
                loaded = [(i, x) for i, x in zip(part, pool.map(load, part)) if x is not None]
                if not loaded:
                    continue
                images = torch.stack([x for _, x in loaded]).to(device, in_dtype, non_blocking=True)
                images = images.contiguous(memory_format=torch.channels_last)
                grid = torch.cat([model.encode_for_cache(chunk) for chunk in images.split(rows)])  # (B, N, C)
                if store is None:
                    store = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype,
                                                      shape=(len(samples), *grid.shape[1:]))
                store[[i for i, _ in loaded]] = _to_numpy(grid, store.dtype)
                progress_path(path).write_text(f"{start + len(part)} of {len(todo)}\n", encoding="utf-8")
    finally:
        if model is encoder:
            encoder.to("cpu").train(was_training)
    if store is None:
        raise ImcapError(f"shard {shown(shard)} has no image that decodes; remove it from the shard list")
    store.flush()
    del store
    os.replace(partial, path)
    progress_path(path).unlink(missing_ok=True)
    log.info("Cached features of %d images of %s in %s", len(todo) - len(bad), shown(shard), path)
    return sorted(bad)
