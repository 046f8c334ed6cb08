"""Test-only: a real SIGKILL in the middle of a checkpoint save.

Put this directory on a subprocess's PYTHONPATH and set IMCAP_TEST_SIGKILL_AT_SAVE=N: Python
imports this module at start-up, and the Nth `torch.save` into a `*.ckpt` or `*.ckpt.tmp` file
of that process writes half of the checkpoint, flushes it to disk and kills its own process
with SIGKILL, which nothing can catch: no `finally`, no cleanup, as with `kill -9` or the OOM
killer. Whatever the checkpoint writer does (in place, via a temporary file, via /tmp) is left
exactly as it was at that moment.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from typing import Any

import torch

_at = int(os.environ["IMCAP_TEST_SIGKILL_AT_SAVE"])
_saves = 0
_save = torch.save


def _save_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    global _saves
    name = str(getattr(f, "name", f))
    if not name.endswith((".ckpt", ".ckpt.tmp")):
        return _save(obj, f, *args, **kwargs)
    _saves += 1
    if _saves != _at:
        return _save(obj, f, *args, **kwargs)
    whole = io.BytesIO()
    _save(obj, whole, *args, **kwargs)
    data = whole.getvalue()
    with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as out:
        out.write(data[: len(data) // 2])
        out.flush()
        os.fsync(out.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


torch.save = _save_then_die
