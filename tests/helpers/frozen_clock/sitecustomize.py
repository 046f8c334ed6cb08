"""Test-only: every process started with this directory on its PYTHONPATH reads the same clock.

IMCAP_TEST_FROZEN_CLOCK=2026-01-02T03:04:05 makes `datetime.now()` return that moment (Python
imports this module at start-up, before Hydra or imcap take `datetime`), so processes started
"in the same second" are that for certain, however long the machine takes to start each.
"""

from __future__ import annotations

import datetime as _datetime
import os

_frozen = _datetime.datetime.fromisoformat(os.environ["IMCAP_TEST_FROZEN_CLOCK"])


class _FrozenDatetime(_datetime.datetime):
    @classmethod
    def now(cls, tz=None):  # noqa: ANN001, ANN206 - the signature of datetime.now
        return _frozen.replace(tzinfo=tz) if tz is not None else _frozen


_datetime.datetime = _FrozenDatetime
