"""`python -m imcap.data prepare`: make a source's download resources present below its root.

Each source declares its files (`resources()`, imcap/data/resources.py): URL, file name, size,
sha256 and where it extracts to. Where no checksum or size is known, the field is `None` and that
check is skipped with a logged note, never faked. For each file, below the dataset root:
1. nothing if it is already extracted (a marker in `downloads/` lists every extracted file with
   its size, and all are there) or was placed by hand (a path in `present` exists: noted as
   unverified);
2. else download it into `downloads/<name>.part`, resuming a partial file (imcap/data/fetch.py);
3. check size and sha256, extract it safely (imcap/data/extract.py), write the marker, then
   delete the archive (`keep_archives=True` keeps it). A disk that fills up is a one-line
   error, and the archive is extracted again on the next run.
A file already in `downloads/` is verified and extracted without a download, which is how
archives behind a sign-up (the Flickr30k images) are brought in by hand.

Offline, the hosts are probed first (`imcap.reachability`: within `IMCAP_DOWNLOAD_TIMEOUT` seconds,
else the probe's default) and the
run fails with one line naming the files to download by hand and the folder to put them in.
`IMCAP_DOWNLOAD_BASE_URL=http://host/dir` (or `prepare(base_url=...)`) fetches every file as
`<base>/<file name>` from a mirror instead, the sign-up ones included.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from imcap.checksums import sha256_file
from imcap.data.extract import extract
from imcap.data.fetch import BASE_URL_ENV, download
from imcap.data.resources import Resource
from imcap.errors import ImcapError
from imcap.reachability import PROBE_SECONDS, unreachable

log = logging.getLogger(__name__)

TIMEOUT_ENV = "IMCAP_DOWNLOAD_TIMEOUT"
DOWNLOADS = "downloads"


def resources_of(source: object) -> tuple[Resource, ...]:
    """The files a source downloads; one without a `resources()` method downloads nothing."""
    declared = getattr(source, "resources", None)
    return tuple(declared()) if callable(declared) else ()


def _marker(downloads: Path, resource: Resource) -> Path:
    return downloads / f"{resource.filename}.done.json"


def _flag(downloads: Path, resource: Resource) -> Path:  # exists while an extraction runs
    return downloads / f"{resource.filename}.extracting"


def why_done(root: Path, resource: Resource) -> str | None:
    """Why `resource` needs no work (extracted and verified, or placed by hand), or None."""
    downloads = root / DOWNLOADS
    marker = _marker(downloads, resource)
    try:
        done = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    except (OSError, ValueError):  # a damaged marker: prepare again
        done = None
    # a marker of another file (its sha256 changed) does not count
    if done is not None and (resource.sha256 is None or done.get("sha256") == resource.sha256):
        files = done.get("files", {})
        gone = [f for f, size in files.items() if not (root / f).is_file() or (root / f).stat().st_size != size]
        if not gone:
            return f"extracted, {len(files)} files verified"
        log.warning("%s: %d extracted files are missing or changed (first: %s); preparing it again",
                    resource.filename, len(gone), gone[0])
    found = [p for p in resource.present if (root / p).exists()]
    if found and not _flag(downloads, resource).exists():  # (an interrupted extraction is redone)
        return f"found in place ({', '.join(found)}; placed by hand, not verified)"
    return None


def _by_hand(resources: Sequence[Resource], base_url: str | None, downloads: Path, dataset: str) -> str:
    where = "; ".join(f"{r.filename} from {r.source(base_url) or r.manual}" for r in resources)
    return (f"download by hand {where}; put the files in {downloads}/ and re-run "
            f"`python -m imcap.data prepare {dataset}` to verify and extract them")


def verify(path: Path, resource: Resource, sha256: str | None = None) -> None:
    """Check size and sha256 as the source declares them; a bad file is moved aside to `*.corrupt`."""
    problem = ""
    size = path.stat().st_size
    if resource.size is None:
        log.info("Size of %s is not recorded by its source: not checked (%d bytes)", path.name, size)
    elif size != resource.size:
        problem = f"{size} bytes, expected {resource.size}"
    if not problem and resource.sha256 is None:
        log.info("sha256 of %s is not recorded by its source: not checked%s", path.name,
                 f" (this copy's is {sha256})" if sha256 else "")
    elif not problem:
        actual = sha256 or sha256_file(path)
        if actual != resource.sha256:
            problem = f"sha256 {actual}, expected {resource.sha256}"
    if problem:
        corrupt = path.with_name(path.name + ".corrupt")
        os.replace(path, corrupt)
        raise ImcapError(f"{path} is not the expected file ({problem}); moved it to {corrupt.name}: "
                         "re-run to download it again")


def prepare(
    root: str | Path,
    resources: Sequence[Resource],
    dataset: str,
    base_url: str | None = None,
    keep_archives: bool = False,
    timeout: float | None = None,
) -> list[str]:
    """Make every resource of `dataset` present and extracted below `root`; one line per file.

    Idempotent: a second run verifies the markers and does nothing else.
    """
    root = Path(root)
    downloads = root / DOWNLOADS
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    timeout = float(timeout or os.environ.get(TIMEOUT_ENV) or 0) or None  # None: each step's own default
    report, todo = [], []
    for resource in resources:
        state = why_done(root, resource)
        if state:
            report.append(f"ok      {resource.filename}: {state}")
        else:
            todo.append(resource)
    fetch = [r for r in todo if not (downloads / r.filename).is_file()]
    if any(r.source(base_url) is None for r in fetch):
        raise ImcapError(f"{dataset} needs files that only a sign-up gives: "
                         + _by_hand(fetch, base_url, downloads, dataset))
    for url in dict.fromkeys(r.source(base_url) for r in fetch):  # probe each host once, quickly
        reason = unreachable(url, timeout or PROBE_SECONDS)
        if reason:
            raise ImcapError(f"cannot reach {urlsplit(url).hostname} ({reason}): "
                             + _by_hand(fetch, base_url, downloads, dataset))
    if todo:
        try:
            downloads.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ImcapError(f"cannot write in {root} ({e.strerror}); pass a writable data.root=DIR") from e
    for resource in todo:
        path = downloads / resource.filename
        sha256 = None
        if not path.is_file():
            log.info("Downloading %s", resource.source(base_url))
            sha256 = download(resource.source(base_url), path, resource.size, timeout)
        verify(path, resource, sha256)
        dest = root / resource.extract_to
        _flag(downloads, resource).touch()
        files = extract(path, dest, resource.members)
        relative = [(Path(resource.extract_to) / f).as_posix().removeprefix("./") for f in files]
        _marker(downloads, resource).write_text(json.dumps({
            "url": resource.source(base_url), "sha256": resource.sha256,
            "files": {f: (root / f).stat().st_size for f in relative},
        }), encoding="utf-8")
        _flag(downloads, resource).unlink()
        if not keep_archives:
            path.unlink()
        report.append(f"placed  {resource.filename}: {len(files)} files extracted into {dest}")
    return report
