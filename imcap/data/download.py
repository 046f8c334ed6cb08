"""Download, verify and safely extract the public archives of a dataset.

`REGISTRY` below is the one place that lists each dataset's archives: URL, file name, size,
sha256 and where it extracts to. Where no checksum or size is known, the field is `None` (with a
comment saying so) and that check is skipped with a logged note, never faked.

For each archive, below the dataset root, `prepare` does:
1. nothing if it is already extracted (a marker in `downloads/` lists every extracted file with
   its size, and all are there) or was placed by hand (a path in `present` exists: noted as
   unverified);
2. else download it into `downloads/<name>.part` with a progress bar, resuming a partial file
   with an HTTP Range request and retrying a dropped connection from where it stopped;
3. check size and sha256, extract it (zip or tar) after refusing absolute paths, `..`, members
   inside symlinks, symlinks or hardlinks that point out of the target folder (resolved through
   the archive's other links, as the file system would), FIFOs and devices, members that expand
   more than `MAX_RATIO` times (a zip bomb), and contents larger than the free disk space; write
   the marker, then delete the archive (`keep_archives=True` keeps it). A disk that fills up
   anyway is a one-line error, and the archive is extracted again on the next run.
A file already in `downloads/` is verified and extracted without a download, which is how
archives behind a sign-up (the Flickr30k images) are brought in by hand.

Offline, the hosts are probed first: within `IMCAP_DOWNLOAD_TIMEOUT` seconds (default 10) the
run fails with one line naming the files to download by hand and the folder to put them in.

Mirrors and tests: `IMCAP_DOWNLOAD_BASE_URL=http://host/dir` (or `prepare(base_url=...)`) fetches
every archive as `<base>/<file name>` instead, the sign-up ones included.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import stat
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from imcap.checksums import sha256_file, sha256_of
from imcap.data.sources import coco, flickr8k, flickr30k
from imcap.errors import ImcapError

log = logging.getLogger(__name__)

BASE_URL_ENV = "IMCAP_DOWNLOAD_BASE_URL"
TIMEOUT_ENV = "IMCAP_DOWNLOAD_TIMEOUT"
DOWNLOADS = "downloads"
CHUNK = 1 << 20
# Expansion refused as a zip bomb: a member, or the whole archive, more than MAX_RATIO times its
# compressed size, once above RATIO_FREE_BYTES (small files, e.g. blank text, may compress
# better). Real datasets stay far below it: JPEG zips ~1x, JSON annotations ~10x.
MAX_RATIO = 200
RATIO_FREE_BYTES = 1 << 20
MAX_LINK_HOPS = 40  # as the kernel's symlink limit (ELOOP)
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class Archive:
    """One file to fetch and unpack below a dataset root."""

    filename: str
    url: str | None  # None: behind a sign-up; `manual` says where to get it
    size: int | None = None  # bytes; None: unknown, not checked
    sha256: str | None = None  # None: unknown, not checked
    extract_to: str = "."  # folder below the dataset root
    members: tuple[str, ...] = ()  # extract only these files (by base name) into extract_to
    present: tuple[str, ...] = ()  # any of these below the root means it was placed by hand
    manual: str = ""

    def source(self, base_url: str | None) -> str | None:
        return f"{base_url.rstrip('/')}/{self.filename}" if base_url else self.url


def _karpathy(member: str) -> Archive:
    # Karpathy's split files of COCO, Flickr8k and Flickr30k in one zip, of which one is kept.
    # Its size and sha256 are published nowhere and not recorded here: not checked.
    return Archive("caption_datasets.zip",
                   "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                   members=(member,), present=(member,))


_COCO = "http://images.cocodataset.org"
_FLICKR8K = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"


def _coco_annotations(year: int, size: int, sha256: str) -> Archive:
    name = f"annotations_trainval{year}.zip"
    return Archive(name, f"{_COCO}/annotations/{name}", size, sha256,
                   present=(coco.annotation_file("train", year),))


def _coco_images(part: str, year: int, size: int, sha256: str) -> Archive:
    folder = coco.image_folder(part, year)  # the zip holds that folder
    return Archive(f"{folder}.zip", f"{_COCO}/zips/{folder}.zip", size, sha256, present=(folder,))


# Sizes and sha256 of the COCO zips as served by images.cocodataset.org (COCO publishes no
# checksums; these are the values torchvision's dataset code and many independent downloads
# record). Small files first, so that a wrong setup fails before the big downloads.
REGISTRY: dict[str, tuple[Archive, ...]] = {
    "coco2014": (
        _karpathy(coco.KARPATHY),
        _coco_annotations(2014, 252_872_794, "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009"),
        _coco_images("val", 2014, 6_645_013_297, "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0"),
        _coco_images("train", 2014, 13_510_573_713,
                     "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"),
    ),
    "coco2017": (  # Karpathy's split names 2014 files, so it is not fetched for 2017
        _coco_annotations(2017, 252_907_541, "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268"),
        _coco_images("val", 2017, 815_585_330, "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05"),
        _coco_images("train", 2017, 19_336_861_798,
                     "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929"),
    ),
    "flickr8k": (
        _karpathy(flickr8k.KARPATHY),
        # Jason Brownlee's public copy of the official distribution (token file, split files,
        # Flicker8k_Dataset/); sizes and sha256 are not recorded here: not checked.
        # Kaggle's copy (captions.txt, Images/) counts as present too
        Archive("Flickr8k_text.zip", f"{_FLICKR8K}/Flickr8k_text.zip",
                present=(flickr8k.OFFICIAL_TOKENS, flickr8k.KAGGLE_CAPTIONS)),
        Archive("Flickr8k_Dataset.zip", f"{_FLICKR8K}/Flickr8k_Dataset.zip",
                present=(flickr8k.OFFICIAL_IMAGES, flickr8k.KAGGLE_IMAGES)),
    ),
    "flickr30k": (
        _karpathy(flickr30k.KARPATHY),
        # Behind a sign-up; the Kaggle zip has unknown size and sha256 (not checked).
        Archive("flickr-image-dataset.zip", None,
                present=flickr30k.IMAGE_DIRS[1:],  # the Kaggle zip's folder, the official tarball's
                manual="`kaggle datasets download hsankesara/flickr-image-dataset` (Kaggle account), "
                       "or extract the official flickr30k-images.tar.gz (form at "
                       "https://shannon.cs.illinois.edu/DenotationGraph/) into the root"),
    ),
}
NOTHING_TO_DOWNLOAD = {
    "shapes": "shapes is generated locally, not downloaded",
    "custom": "custom has nothing to download: it reads your own images and captions",
}


def archives_for(name: str, year: int | None = None) -> tuple[Archive, ...]:
    """The registry entry of the `data=NAME` config (COCO by `data.source.year`)."""
    key = f"coco{year or 2014}" if name == "coco" else name
    if key not in REGISTRY:
        raise ImcapError(f"no download recipe for data={name}; choose one of "
                         f"{sorted({k.rstrip('0123456789') for k in REGISTRY} | set(NOTHING_TO_DOWNLOAD))} "
                         "or place its files under data.root by hand")
    return REGISTRY[key]


# -- what is already there ----------------------------------------------------------------------
def _marker(downloads: Path, archive: Archive) -> Path:
    return downloads / f"{archive.filename}.done.json"


def _flag(downloads: Path, archive: Archive) -> Path:  # exists while an extraction runs
    return downloads / f"{archive.filename}.extracting"


def installed(root: Path, archive: Archive) -> str | None:
    """Why `archive` needs no work (extracted and verified, or placed by hand), or None."""
    downloads = root / DOWNLOADS
    marker = _marker(downloads, archive)
    try:
        done = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    except (OSError, ValueError):  # a damaged marker: prepare again
        done = None
    if done is not None:
        files = done.get("files", {})
        if done.get("sha256") == archive.sha256 or archive.sha256 is None:
            gone = [f for f, size in files.items()
                    if not (root / f).is_file() or (root / f).stat().st_size != size]
            if not gone:
                return f"extracted, {len(files)} files verified"
            log.warning("%s: %d extracted files are missing or changed (first: %s); preparing it again",
                        archive.filename, len(gone), gone[0])
    found = [p for p in archive.present if (root / p).exists()]
    if found and not _flag(downloads, archive).exists():  # (an interrupted extraction is redone)
        return f"found in place ({', '.join(found)}; placed by hand, not verified)"
    return None


# -- network --------------------------------------------------------------------------------------
def _unreachable(url: str, timeout: float) -> str | None:
    """Why no TCP connection to the URL's host (or its proxy) opens within `timeout`, or None.

    Runs in a thread so that a hanging DNS lookup cannot outlast the timeout.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    outcome: dict[str, str] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            outcome["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"no answer from {host} within {timeout:g} s"
    return outcome.get("error")


def _by_hand(archives: Sequence[Archive], base_url: str | None, downloads: Path, dataset: str) -> str:
    where = "; ".join(f"{a.filename} from {a.source(base_url) or a.manual}" for a in archives)
    return (f"download by hand {where}; put the files in {downloads}/ and re-run "
            f"`python -m imcap.data prepare {dataset}` to verify and extract them")


class _Transfer:
    """One file's download state: bytes in the .part file and their running sha256."""

    def __init__(self, url: str, part: Path, timeout: float, bar: tqdm):
        self.url, self.part, self.timeout, self.bar = url, part, timeout, bar
        self.done = part.stat().st_size if part.is_file() else 0
        # resuming: the hash covers the bytes already there
        self.digest = sha256_of(part) if self.done else hashlib.sha256()

    def restart(self) -> None:
        self.done, self.digest = 0, hashlib.sha256()
        self.bar.reset(total=self.bar.total)

    def attempt(self) -> int | None:
        """One GET from `self.done` on; returns the expected file size if the server said."""
        headers = {"User-Agent": "imcap-prepare"}
        if self.done:
            headers["Range"] = f"bytes={self.done}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                              timeout=self.timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and self.done:  # nothing after what we have: complete (verified next)
                return self.done
            raise ImcapError(f"HTTP {e.code} {e.reason} for {self.url}; check the URL or the mirror "
                             f"({BASE_URL_ENV})") from e
        with response:
            total = None
            if self.done and response.status == 206:
                m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != self.done:
                    self.restart()
                    raise http.client.HTTPException("unexpected Content-Range; restarting from byte 0")
                total = int(m.group(2)) if m.group(2) != "*" else None
            elif self.done:  # 200: the server ignores Range
                log.info("%s does not resume downloads; restarting from byte 0", self.url)
                self.restart()
            length = response.headers.get("Content-Length")
            if total is None and length is not None:
                total = self.done + int(length)
            with open(self.part, "ab" if self.done else "wb") as f:
                while block := response.read(CHUNK):
                    f.write(block)
                    self.digest.update(block)
                    self.done += len(block)
                    self.bar.update(len(block))
            return total


def download(url: str, path: Path, size: int | None = None, timeout: float = 10.0, retries: int = 3) -> str:
    """Fetch `url` into `path` via `path.part` (resumed if present); returns the sha256.

    A dropped connection is retried from where it stopped, up to `retries` times in a row
    without progress; then the .part file stays for the next run to resume.
    """
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
               disable=None, leave=False)
    transfer = _Transfer(url, part, timeout, bar)
    bar.update(transfer.done)
    if transfer.done:
        log.info("Resuming %s at byte %d", path.name, transfer.done)
    stalled, reason = 0, ""
    try:
        while stalled <= retries:
            before = transfer.done
            try:
                total = transfer.attempt()
                if total is None or transfer.done >= total:
                    break
                reason = f"connection closed at byte {transfer.done} of {total}"
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
                    raise ImcapError(f"cannot write {part} ({e.strerror}); free some space or choose "
                                     "another data.root") from e
                reason = f"{type(e).__name__}: {e}"
            stalled = 0 if transfer.done > before else stalled + 1
            log.info("Download of %s interrupted (%s); resuming from byte %d", path.name, reason, transfer.done)
            time.sleep(min(0.5 * 2 ** stalled, 5.0))
        else:
            raise ImcapError(f"download of {url} stopped at byte {transfer.done} ({reason}); re-run to "
                             f"resume, or download it by hand into {path}")
    finally:
        bar.close()
    os.replace(part, path)
    return transfer.digest.hexdigest()


def verify(path: Path, archive: Archive, sha256: str | None = None) -> None:
    """Check size and sha256 against the registry; a bad file is moved aside to `*.corrupt`."""
    problem = ""
    size = path.stat().st_size
    if archive.size is None:
        log.info("Size of %s is not recorded in the registry: not checked (%d bytes)", path.name, size)
    elif size != archive.size:
        problem = f"{size} bytes, expected {archive.size}"
    if not problem and archive.sha256 is None:
        log.info("sha256 of %s is not recorded in the registry: not checked%s", path.name,
                 f" (this copy's is {sha256})" if sha256 else "")
    elif not problem:
        actual = sha256 or sha256_file(path)
        if actual != archive.sha256:
            problem = f"sha256 {actual}, expected {archive.sha256}"
    if problem:
        corrupt = path.with_name(path.name + ".corrupt")
        os.replace(path, corrupt)
        raise ImcapError(f"{path} is not the expected file ({problem}); moved it to {corrupt.name}: "
                         "re-run to download it again")


# -- safe extraction -----------------------------------------------------------------------------
def _member_path(name: str, archive: Path) -> PurePosixPath:
    """The member's relative path; refuses absolute paths and `..`."""
    clean = name.replace("\\", "/")
    rel = PurePosixPath(clean)
    if rel.is_absolute() or re.match(r"^[A-Za-z]:", clean) or ".." in rel.parts:
        raise ImcapError(f"{archive}: member {name!r} points outside the folder it extracts to "
                         "(absolute path or '..'); refusing to extract this archive")
    return rel


def _check_link(rel: PurePosixPath, target: str, archive: Path, hard: bool = False) -> None:
    """Refuse a link whose target lies outside the extraction folder."""
    target = target.replace("\\", "/")
    base = PurePosixPath() if hard else rel.parent  # hardlink targets are archive paths
    joined = os.path.normpath((base / target).as_posix()) if target else ".."
    if target.startswith("/") or re.match(r"^[A-Za-z]:", target) or joined == ".." or joined.startswith("../"):
        kind = "hardlink" if hard else "symlink"
        raise ImcapError(f"{archive}: {kind} {rel.as_posix()!r} -> {target!r} points outside the folder "
                         "it extracts to; refusing to extract this archive")


def _check_not_through_links(plan: Sequence[PurePosixPath], links: set[PurePosixPath], archive: Path) -> None:
    for rel in plan:
        for parent in rel.parents:
            if parent in links:
                raise ImcapError(f"{archive}: member {rel.as_posix()!r} lies inside the symlink "
                                 f"{parent.as_posix()!r}; refusing to extract this archive")


def _resolve(parts: Sequence[str], links: dict[PurePosixPath, str]) -> PurePosixPath | None:
    """Where `parts` (relative to the extraction folder) leads once the archive's own symlinks
    are followed, as the file system will after extraction; None if it leaves the folder."""
    stack: list[str] = []
    todo, hops = list(parts), 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(part)
        target = links.get(PurePosixPath(*stack))
        if target is not None:
            hops += 1
            if hops > MAX_LINK_HOPS or target.startswith("/") or re.match(r"^[A-Za-z]:", target):
                return None
            stack.pop()
            todo = target.split("/") + todo
    return PurePosixPath(*stack)


def _check_link_chains(links: dict[PurePosixPath, str], archive: Path) -> None:
    """Each symlink followed through the others (`sub/y -> ..` then `x -> sub/y/..`) must stay
    inside the extraction folder."""
    for rel, target in links.items():
        if _resolve([*rel.parent.parts, *target.replace("\\", "/").split("/")], links) is None:
            raise ImcapError(f"{archive}: symlink {rel.as_posix()!r} -> {target!r} leads outside the folder it "
                             "extracts to through the archive's other links; refusing to extract this archive")


def _check_sizes(sizes: Sequence[tuple[str, int, int | None]], archive: Path, dest: Path) -> None:
    """(name, size, compressed size or None) of the members to write: refuse a zip bomb and
    contents that cannot fit on the disk, before anything is written."""
    for name, size, packed in sizes:
        if packed is not None and size > RATIO_FREE_BYTES and size > MAX_RATIO * max(packed, 1):
            raise ImcapError(f"{archive}: member {name!r} expands {size / max(packed, 1):.0f}x ({size:,} bytes "
                             f"from {packed:,}), more than {MAX_RATIO}x (a zip bomb?); refusing to extract "
                             "this archive")
    total = sum(size for _, size, _ in sizes)
    packed_total = archive.stat().st_size
    if total > RATIO_FREE_BYTES and total > MAX_RATIO * max(packed_total, 1):
        raise ImcapError(f"{archive}: its contents expand {total / max(packed_total, 1):.0f}x ({total:,} bytes "
                         f"from {packed_total:,}), more than {MAX_RATIO}x (a zip bomb?); refusing to extract "
                         "this archive")
    free = shutil.disk_usage(dest).free
    if total > free:
        raise ImcapError(f"{archive} needs {total / 2**20:,.1f} MiB in {dest}, which has {free / 2**20:,.1f} MiB "
                         "free; free some space or choose another data.root")


def _write_error(e: OSError, archive: Path, out: Path) -> ImcapError:
    return ImcapError(f"cannot extract {archive} into {out.parent} ({e.strerror}); free some space or choose "
                      "another data.root, then re-run")


class _OnDisk:
    """Checks that folders already on disk do not lead out of `dest` (e.g. an old symlink)."""

    def __init__(self, dest: Path, archive: Path):
        self.dest, self.real, self.archive, self.ok = dest, dest.resolve(), archive, set()

    def check(self, rel: PurePosixPath) -> Path:
        out = self.dest / rel
        parent = out.parent
        if parent not in self.ok:
            if not parent.resolve().is_relative_to(self.real):
                raise ImcapError(f"{self.archive}: {parent} leads outside {self.dest} (a symlink on disk); "
                                 "remove it and re-run")
            self.ok.add(parent)
        if out.is_symlink():  # never write through a link left by an earlier run
            out.unlink()
        return out


def _pick(rel: PurePosixPath, members: Sequence[str]) -> PurePosixPath | None:
    """With `members`, the flattened name of a wanted file (None: skip it); else `rel`."""
    if not members:
        return rel
    return PurePosixPath(rel.name) if rel.name in members else None


def _extract_zip(path: Path, dest: Path, members: Sequence[str], bar: tqdm) -> list[PurePosixPath]:
    with zipfile.ZipFile(path) as zf:
        plan, links = [], {}
        for info in zf.infolist():
            rel = _pick(_member_path(info.filename, path), members)
            if rel is None or (members and info.is_dir()) or rel == PurePosixPath("."):
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                target = zf.read(info).decode("utf-8", "replace")
                _check_link(rel, target, path)
                links[rel] = target
            plan.append((info, rel))
        _check_not_through_links([rel for _, rel in plan], set(links), path)
        _check_link_chains(links, path)
        _check_members(members, [rel for _, rel in plan], path)
        _check_sizes([(i.filename, i.file_size, i.compress_size) for i, rel in plan
                      if not i.is_dir() and rel not in links], path, dest)
        bar.reset(total=len(plan))
        disk, files = _OnDisk(dest, path), []
        for info, rel in plan:
            out = disk.check(rel)
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
            elif rel in links:
                out.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(links[rel], out)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                except OSError as e:
                    if e.errno not in WRITE_ERRORS:
                        raise
                    out.unlink(missing_ok=True)
                    raise _write_error(e, path, out) from e
                files.append(rel)
            bar.update()
        return files


def _extract_tar(path: Path, dest: Path, members: Sequence[str], bar: tqdm) -> list[PurePosixPath]:
    with tarfile.open(path) as tf:
        plan, links = [], {}
        for info in tf.getmembers():
            rel = _pick(_member_path(info.name, path), members)
            if rel is None or (members and not info.isfile()) or rel == PurePosixPath("."):
                continue
            if info.issym():
                _check_link(rel, info.linkname, path)
                links[rel] = info.linkname
            elif info.islnk():
                _check_link(rel, info.linkname, path, hard=True)
            elif not (info.isfile() or info.isdir()):
                raise ImcapError(f"{path}: member {info.name!r} is a device or fifo; refusing to extract "
                                 "this archive")
            info.name = rel.as_posix()
            plan.append(info)
        _check_not_through_links([PurePosixPath(i.name) for i in plan], set(links), path)
        _check_link_chains(links, path)
        _check_members(members, [PurePosixPath(i.name) for i in plan], path)
        _check_sizes([(i.name, i.size, None) for i in plan if i.isfile()], path, dest)
        bar.reset(total=len(plan))
        disk = _OnDisk(dest, path)
        # Python's own "data" filter (3.11.4+) re-checks every member as it is written
        safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for info in plan:
            disk.check(PurePosixPath(info.name))
            try:
                tf.extract(info, dest, **safety)
            except tarfile.TarError as e:
                raise ImcapError(f"{path}: refusing member {info.name!r} ({e})") from e
            except OSError as e:
                if e.errno not in WRITE_ERRORS:
                    raise
                (dest / info.name).unlink(missing_ok=True)
                raise _write_error(e, path, dest / info.name) from e
            bar.update()
        return [PurePosixPath(i.name) for i in plan if i.isfile() or i.islnk()]


def _check_members(members: Sequence[str], planned: Sequence[PurePosixPath], archive: Path) -> None:
    missing = sorted(set(members) - {rel.name for rel in planned})
    if missing:
        raise ImcapError(f"{archive} does not contain {missing}; is it the right archive?")


def extract(path: Path, dest: Path, members: Sequence[str] = ()) -> list[PurePosixPath]:
    """Unpack a zip or tar archive into `dest` once every member has passed the checks.

    Returns the regular files written, relative to `dest`. With `members`, only files of those
    base names are extracted, directly into `dest`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    bar = tqdm(unit="file", desc=f"extract {path.name}", disable=None, leave=False)
    try:
        if zipfile.is_zipfile(path):
            return _extract_zip(path, dest, members, bar)
        if tarfile.is_tarfile(path):
            return _extract_tar(path, dest, members, bar)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise ImcapError(f"{path} is damaged ({e}); delete it and re-run") from e
    finally:
        bar.close()
    raise ImcapError(f"{path} is neither a zip nor a tar archive; delete it and re-run")


# -- the whole dataset ---------------------------------------------------------------------------
def prepare(
    root: str | Path,
    archives: Sequence[Archive],
    dataset: str,
    base_url: str | None = None,
    keep_archives: bool = False,
    timeout: float | None = None,
) -> list[str]:
    """Make every archive of `dataset` present and extracted below `root`; one line per archive.

    Idempotent: a second run verifies the markers and does nothing else.
    """
    root = Path(root)
    downloads = root / DOWNLOADS
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    timeout = float(timeout or os.environ.get(TIMEOUT_ENV) or 10.0)
    report, todo = [], []
    for archive in archives:
        state = installed(root, archive)
        if state:
            report.append(f"ok      {archive.filename}: {state}")
        else:
            todo.append(archive)
    fetch = [a for a in todo if not (downloads / a.filename).is_file()]
    if any(a.source(base_url) is None for a in fetch):
        raise ImcapError(f"{dataset} needs files that only a sign-up gives: "
                         + _by_hand(fetch, base_url, downloads, dataset))
    for url in dict.fromkeys(a.source(base_url) for a in fetch):  # probe each host once, quickly
        reason = _unreachable(url, timeout)
        if reason:
            raise ImcapError(f"cannot reach {urlsplit(url).hostname} ({reason}): "
                             + _by_hand(fetch, base_url, downloads, dataset))
    if todo:
        try:
            downloads.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ImcapError(f"cannot write in {root} ({e.strerror}); pass a writable "
                             "data.root=DIR") from e
    for archive in todo:
        path = downloads / archive.filename
        sha256 = None
        if not path.is_file():
            log.info("Downloading %s", archive.source(base_url))
            sha256 = download(archive.source(base_url), path, archive.size, timeout)
        verify(path, archive, sha256)
        dest = root / archive.extract_to
        _flag(downloads, archive).touch()
        files = extract(path, dest, archive.members)
        relative = [(Path(archive.extract_to) / f).as_posix().removeprefix("./") for f in files]
        _marker(downloads, archive).write_text(json.dumps({
            "url": archive.source(base_url), "sha256": archive.sha256,
            "files": {f: (root / f).stat().st_size for f in relative},
        }), encoding="utf-8")
        _flag(downloads, archive).unlink()
        if not keep_archives:
            path.unlink()
        report.append(f"placed  {archive.filename}: {len(files)} files extracted into {dest}")
    return report
