"""The one record type every data source yields; nothing downstream knows file formats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CaptionRecord:
    """One image with all of its reference captions.

    `extra` carries source-specific annotations that later stages may use (for the shapes demo:
    the object boxes used for attention grounding); readers must not put formats in it.
    """

    image_id: str | int
    image_path: str
    captions: tuple[str, ...]
    split: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
