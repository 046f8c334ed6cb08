"""Pretrained weight files of timm and open_clip models: the local cache first, a download only
when the network answers, else at once a one-line error naming the file and where to put it.

Both libraries fetch through the Hugging Face hub (`huggingface_hub`), which on a machine without
network retries for about 25 s per file before it gives up; and they fall back to a random init
in places. Here the cache is looked up first (`try_to_load_from_cache`, the layout
`hf download` writes), HF_HUB_OFFLINE is honoured, and the host is probed (imcap.reachability)
before any download, so offline machines fail immediately and never train on random weights
they did not ask for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from imcap.errors import ImcapError
from imcap.reachability import unreachable

HF_HOST = "huggingface.co"


@dataclass(frozen=True)
class WeightsFile:
    """Where a library keeps one model's pretrained weights.

    Its provenance is the library's: a file it downloads into its own cache, from a hub repository
    (whose revision the hub decides, so there is no hash to pin) or a URL. Files of pinned,
    hashed PyPI wheels are imcap.assets.WheelFile; dataset archives, imcap.data.resources.Resource.
    """

    what: str  # e.g. "timm convnext_nano.in12k_ft_in1k", for messages
    repo_id: str | None = None  # Hugging Face hub repository
    filenames: tuple[str, ...] = ()  # candidate files in it, preferred first
    url: str | None = None  # a plain URL, used where there is no hub repository
    url_cache: Path | None = None  # the folder the library caches URL downloads in
    random_init: str = "model.encoder.pretrained=null"  # the option that asks for a random init


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline_reason(url: str) -> str | None:
    """Why `url`'s host cannot be reached now (None: it, or the proxy that carries it, answered)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    if constants.HF_HUB_OFFLINE or flag.upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    reason = unreachable(url)
    return f"{urlparse(url).hostname} cannot be reached: {reason}" if reason else None


def _cached(weights: WeightsFile) -> Path | None:
    if weights.repo_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in weights.filenames:
            found = try_to_load_from_cache(weights.repo_id, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    elif weights.url and weights.url_cache:
        path = weights.url_cache / Path(urlparse(weights.url).path).name
        if path.is_file():
            return path
    return None


def _where(weights: WeightsFile) -> str:
    """What to place where, and how to get it on a machine that is online."""
    if weights.repo_id:
        cache, first = hf_cache_dir(), weights.filenames[0]
        folder = "models--" + weights.repo_id.replace("/", "--")
        return (f"on a machine that is online run `hf download {weights.repo_id} {first}` and copy "
                f"{folder} from its Hugging Face cache into {cache}, or pass model.encoder.weights_path=FILE "
                f"with {first} from https://huggingface.co/{weights.repo_id}")
    name = Path(urlparse(weights.url or "").path).name
    return f"place {name} (from {weights.url}) in {weights.url_cache}, or pass model.encoder.weights_path=FILE"


def fetch(weights: WeightsFile) -> Path:
    """The local path of `weights`: from the cache, else downloaded; never a silent fallback."""
    found = _cached(weights)
    if found is not None:
        return found
    if not weights.repo_id and not weights.url:
        raise ImcapError(f"{weights.what} has no pretrained weights to download; "
                         f"pass model.encoder.weights_path=FILE or set {weights.random_init}")
    reason = _offline_reason(f"https://{HF_HOST}" if weights.repo_id else weights.url or "")
    if reason:
        raise ImcapError(f"pretrained weights for {weights.what} are not in the local cache and {reason}: "
                         f"{_where(weights)}, or set {weights.random_init} for a random init")
    try:
        return _download(weights)
    except Exception as e:  # any failure of the download is the same user problem
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ImcapError(f"pretrained weights for {weights.what} could not be downloaded ({first}): "
                         f"{_where(weights)}, or set {weights.random_init} for a random init") from e


def _download(weights: WeightsFile) -> Path:
    if weights.repo_id:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        for filename in weights.filenames[:-1]:
            try:
                return Path(hf_hub_download(weights.repo_id, filename))
            except EntryNotFoundError:  # e.g. no safetensors file in this repository: the next
                continue
        return Path(hf_hub_download(weights.repo_id, weights.filenames[-1]))
    assert weights.url and weights.url_cache
    target = weights.url_cache / Path(urlparse(weights.url).path).name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(weights.url, str(target), progress=True)
    return target
