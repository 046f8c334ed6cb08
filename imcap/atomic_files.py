"""Atomic file writes: a reader (or a later run) sees the old file or the new one, never half.

Every output a run leaves (metrics.json, predictions/*.json, vocab.json, checkpoints) is written
to a temporary file beside the target and moved over it with `os.replace`, which is atomic
within one filesystem. Each writer has its own temporary name (`<stem>.<pid>-<random><suffix>.tmp`),
so two processes writing the same target never write into one file; the temporary is removed
when the write fails, and a process killed mid-write leaves at most its own `*.tmp`.

A full disk (or quota) is a user problem, not a bug: one ImcapError naming the file; the
target keeps its old content.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from imcap.errors import ImcapError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def run_stamp() -> str:
    """A run directory's name: its start time, sortable, then a random part, so that runs
    started in the same second (a job array, two shells) get different directories.

    Under SLURM it is the job's own name instead, `slurm-<job>[_<array task>][.<step>]`: a
    requeued job keeps its id, so it comes back to its run directory, where Lightning finds the
    checkpoint it saved before the time limit and resumes; the tasks of one DDP step share it.
    """
    env = os.environ
    job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if job:
        task = f"_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID") else ""
        step = env.get("SLURM_STEP_ID", "")
        return f"slurm-{job}{task}" + (f".{step}" if step.isdigit() else "")
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"


def unique_temporary(path: Path) -> Path:
    """Create and return an empty temporary file beside `path`, named for this writer alone.

    Opened with O_EXCL, so the name is never shared; mode 0o666 less the umask, as `open` gives
    the target itself (tempfile.mkstemp's 0o600 would make every output private).
    """
    while True:
        tmp = path.with_name(f"{path.stem}.{os.getpid()}-{secrets.token_hex(4)}{path.suffix}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # another writer drew the same name: draw again
            continue


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; moved over `path` when the block ends, removed
    if it raises. A full disk is one ImcapError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = unique_temporary(path)  # same directory: os.replace stays on one filesystem
    except OSError as e:
        full = full_disk_error(path, e)
        if full is not None:
            raise full from e
        raise
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = full_disk_error(path, e)
        if full is not None:
            raise full from e
        raise


class _WriteRecorder:
    """A file whose failed writes are remembered: torch.save turns the OSError of a full disk
    into a RuntimeError ("unexpected pos ...") that no longer says why."""

    def __init__(self, file: IO[bytes]):
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:  # flush, fileno, seek, tell, ...: the file's own
        return getattr(self.file, name)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then move it over `path`."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        recorder = _WriteRecorder(f)
        try:
            write(recorder)  # type: ignore[arg-type]
        except Exception as e:
            if recorder.error is not None and recorder.error is not e:
                raise recorder.error from e  # the disk's own words, which `replacing` reports
            raise
        f.flush()
        os.fsync(f.fileno())  # the data is on disk before the name points at it


def full_disk_error(path: Path, error: BaseException) -> ImcapError | None:
    """The user error for a write to `path` that failed for want of space; None for other errors."""
    if not (isinstance(error, OSError) and error.errno in FULL_DISK):
        return None
    return ImcapError(f"cannot write {path}: {os.strerror(error.errno)}; free space on that disk (or write "
                      f"elsewhere, e.g. paths.log_dir=DIR) and run again; {path.name} is left as it was")


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write JSON (UTF-8, non-ASCII kept) atomically."""
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
