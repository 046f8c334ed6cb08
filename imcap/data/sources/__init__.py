"""Data sources: one reader per on-disk format, each yielding `CaptionRecord`s.

A source has two methods: `prepare()` makes the data exist locally (generate, or check what
the user placed) and `records()` reads it. Nothing outside this package knows file formats.
A source that downloads declares its files too, as torchvision's datasets do:
`resources() -> tuple[Resource, ...]` (imcap/data/resources.py); `python -m imcap.data prepare`
fetches, checks and extracts them.
Each source registers itself under the name of its conf/data option:
`@register("source", "coco")` (see imcap/registry.py).
"""

from __future__ import annotations

from typing import Protocol

from imcap.data.records import CaptionRecord


class CaptionSource(Protocol):
    def prepare(self) -> None: ...

    def records(self) -> list[CaptionRecord]: ...
