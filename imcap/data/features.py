"""Grid-feature cache: run a frozen encoder once per image, read memory-mapped features after.

A cache file is keyed by a hash of the encoder's weights, its transform and the image list, so
a stale cache is never read. Writes go to `<key>.partial.npy` with a progress counter beside it
and are renamed into place when complete: an interrupted extraction resumes where it stopped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from imcap.data.images import load_image

log = logging.getLogger(__name__)


class ImageFiles(Dataset):
    """Decoded, transformed images by path (decoding runs in DataLoader workers)."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


def cache_key(encoder_fingerprint: str, image_paths: Sequence[str], dtype: str) -> str:
    h = hashlib.sha256(encoder_fingerprint.encode())
    h.update(dtype.encode())
    for p in image_paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def extract_features(
    encoder: torch.nn.Module,
    image_paths: Sequence[str],
    transform: Callable,
    cache_dir: str | Path,
    fingerprint: str,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str = "float16",
    description: str = "",
) -> np.ndarray:
    """(num_images, N, C) grid features of `encoder` for `image_paths`, memory-mapped.

    `encoder(images) -> (grid (B, N, C), pooled (B, C))`; only the grid is stored, since the
    pooled vector of these encoders is the grid mean.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(fingerprint, image_paths, dtype)
    final = cache_dir / f"{key}.npy"
    if final.is_file():
        return np.load(final, mmap_mode="r")
    # One extractor at a time per cache entry: DDP ranks (and parallel runs) wait for the first
    # and then read its file instead of writing the same partial file concurrently.
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_file():
            return np.load(final, mmap_mode="r")
        return _extract(encoder, image_paths, transform, cache_dir, key, final, batch_size, num_workers,
                        dtype, description)


def _extract(encoder, image_paths, transform, cache_dir: Path, key: str, final: Path, batch_size: int,
             num_workers: int, dtype: str, description: str) -> np.ndarray:

    partial = cache_dir / f"{key}.partial.npy"
    progress = cache_dir / f"{key}.progress.json"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    was_training = encoder.training
    encoder.eval().to(device)
    done = json.loads(progress.read_text())["done"] if progress.is_file() and partial.is_file() else 0
    store = np.load(partial, mmap_mode="r+") if done else None

    remaining = ImageFiles(image_paths[done:], transform)
    loader = DataLoader(remaining, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    bar = tqdm(total=len(image_paths), initial=done, unit="img", desc=f"{description} features".strip(), leave=False)
    try:
        with torch.inference_mode():
            for images in loader:
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                grid, _ = encoder(images)  # (B, N, C)
                if store is None:
                    shape = (len(image_paths), *grid.shape[1:])
                    store = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
                store[done : done + len(grid)] = grid.float().cpu().numpy().astype(dtype)
                done += len(grid)
                if done % (batch_size * 8) < batch_size or done == len(image_paths):
                    store.flush()
                    progress.write_text(json.dumps({"done": done}))
                bar.update(len(grid))
    finally:
        bar.close()
        encoder.to("cpu").train(was_training)
    assert store is not None and done == len(image_paths)
    store.flush()
    del store
    os.replace(partial, final)
    progress.unlink(missing_ok=True)
    log.info("Cached %s features of %d images in %s", description, done, final)
    return np.load(final, mmap_mode="r")
