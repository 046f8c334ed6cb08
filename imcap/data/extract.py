"""Unpack an untrusted zip or tar archive into a folder, refusing it whole before anything is
written when a member would leave the folder, is a link in a zip, a device or FIFO, expands
more than `MAX_RATIO` times (a zip bomb), or would not fit on the disk."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from imcap.errors import ImcapError

CHUNK = 1 << 20
# Expansion refused as a zip bomb: a member, or the whole archive, more than MAX_RATIO times its
# compressed size, once above RATIO_FREE_BYTES (small files, e.g. blank text, may compress
# better). Real datasets stay far below it: JPEG zips ~1x, JSON annotations ~10x.
MAX_RATIO = 200
RATIO_FREE_BYTES = 1 << 20
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _refuse(archive: Path, what: str) -> ImcapError:
    return ImcapError(f"{archive}: {what}; refusing to extract this archive")


def _member_path(name: str, archive: Path) -> PurePosixPath:
    """The member's relative path; refuses absolute paths and `..`."""
    clean = name.replace("\\", "/")
    rel = PurePosixPath(clean)
    if rel.is_absolute() or re.match(r"^[A-Za-z]:", clean) or ".." in rel.parts:
        raise _refuse(archive, f"member {name!r} points outside the folder it extracts to (absolute path or '..')")
    return rel


def _wanted(rel: PurePosixPath, members: Sequence[str]) -> PurePosixPath | None:
    """With `members`, the flattened name of a wanted file (None: skip it); else `rel`."""
    if not members:
        return rel
    return PurePosixPath(rel.name) if rel.name in members else None


def _check_on_disk(dest: Path, rels: Iterable[PurePosixPath], archive: Path) -> None:
    """Folders already on disk (an old symlink left by another tool) must not lead out of `dest`."""
    real = dest.resolve()
    for parent in {(dest / rel).parent for rel in rels}:
        if not parent.resolve().is_relative_to(real):
            raise ImcapError(f"{archive}: {parent} leads outside {dest} (a symlink on disk); remove it and re-run")


def _check_sizes(sizes: Sequence[tuple[str, int, int | None]], archive: Path, dest: Path) -> None:
    """(name, size, compressed size or None) of the members to write: refuse a zip bomb and
    contents that cannot fit on the disk, before anything is written."""
    for name, size, packed in sizes:
        if packed is not None and size > RATIO_FREE_BYTES and size > MAX_RATIO * max(packed, 1):
            raise _refuse(archive, f"member {name!r} expands {size / max(packed, 1):.0f}x ({size:,} bytes from "
                          f"{packed:,}), more than {MAX_RATIO}x (a zip bomb?)")
    total, packed_total = sum(size for _, size, _ in sizes), archive.stat().st_size
    if total > RATIO_FREE_BYTES and total > MAX_RATIO * max(packed_total, 1):
        raise _refuse(archive, f"its contents expand {total / max(packed_total, 1):.0f}x ({total:,} bytes from "
                      f"{packed_total:,}), more than {MAX_RATIO}x (a zip bomb?)")
    free = shutil.disk_usage(dest).free
    if total > free:
        raise ImcapError(f"{archive} needs {total / 2**20:,.1f} MiB in {dest}, which has {free / 2**20:,.1f} MiB "
                         "free; free some space or choose another data.root")


def _check_members(members: Sequence[str], planned: Iterable[PurePosixPath], archive: Path) -> None:
    missing = sorted(set(members) - {rel.name for rel in planned})
    if missing:
        raise ImcapError(f"{archive} does not contain {missing}; is it the right archive?")


def _write_error(e: OSError, archive: Path, out: Path) -> ImcapError:
    return ImcapError(f"cannot extract {archive} into {out.parent} ({e.strerror}); free some space or choose "
                      "another data.root, then re-run")


def _extract_zip(path: Path, dest: Path, members: Sequence[str], bar: tqdm) -> list[PurePosixPath]:
    with zipfile.ZipFile(path) as zf:
        plan = []
        for info in zf.infolist():
            rel = _wanted(_member_path(info.filename, path), members)
            if rel is None or (members and info.is_dir()) or rel == PurePosixPath("."):
                continue
            if stat.S_ISLNK(info.external_attr >> 16):  # dataset zips hold none: never create one
                raise _refuse(path, f"member {info.filename!r} is a symlink")
            plan.append((info, rel))
        _check_members(members, [rel for _, rel in plan], path)
        _check_on_disk(dest, [rel for _, rel in plan], path)
        _check_sizes([(i.filename, i.file_size, i.compress_size) for i, _ in plan if not i.is_dir()], path, dest)
        bar.reset(total=len(plan))
        files = []
        for info, rel in plan:
            out = dest / rel
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                if out.is_symlink():  # never write through a link left by an earlier run
                    out.unlink()
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


def _through_link(path: str, links: set[PurePosixPath]) -> PurePosixPath | None:
    """The first of the archive's own symlinks that `path` passes through, or None."""
    parts = path.split("/")
    for i in range(1, len(parts)):
        prefix = PurePosixPath(os.path.normpath("/".join(parts[:i])))
        if prefix in links:
            return prefix
    return None


def _extract_tar(path: Path, dest: Path, members: Sequence[str], bar: tqdm) -> list[PurePosixPath]:
    with tarfile.open(path) as tf:
        plan = []
        for info in tf.getmembers():
            rel = _wanted(_member_path(info.name, path), members)
            if rel is None or (members and not info.isfile()) or rel == PurePosixPath("."):
                continue
            info.name = rel.as_posix()
            plan.append(info)
        _check_on_disk(dest, [PurePosixPath(i.name) for i in plan], path)
        # The standard library's "data" filter refuses absolute paths, links out of `dest`, devices
        # and FIFOs; it judges links by what is on disk, so a link through another link of the
        # archive (`sub/y -> ..`, `x -> sub/y/../etc`) is refused here, before anything is written.
        links = {PurePosixPath(i.name) for i in plan if i.issym()}
        for info in plan:
            try:
                tarfile.data_filter(info, str(dest))
            except tarfile.FilterError as e:
                raise _refuse(path, f"member {info.name!r}: {e}") from e
            target = (PurePosixPath(info.name).parent / info.linkname).as_posix() if info.issym() else ""
            via = _through_link(info.name, links) or (target and _through_link(target + "/", links))
            if via:
                raise _refuse(path, f"member {info.name!r} leads through the archive's symlink {via.as_posix()!r}")
        _check_members(members, [PurePosixPath(i.name) for i in plan], path)
        _check_sizes([(i.name, i.size, None) for i in plan if i.isfile()], path, dest)
        bar.reset(total=len(plan))
        for info in plan:
            try:
                tf.extract(info, dest, filter="data")  # checks each member again as it is written
            except tarfile.FilterError as e:
                raise _refuse(path, f"member {info.name!r}: {e}") from e
            except OSError as e:
                if e.errno not in WRITE_ERRORS:
                    raise
                (dest / info.name).unlink(missing_ok=True)
                raise _write_error(e, path, dest / info.name) from e
            bar.update()
        return [PurePosixPath(i.name) for i in plan if i.isfile() or i.islnk()]


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
