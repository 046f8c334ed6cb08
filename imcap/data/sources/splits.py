"""Deterministic per-image splits for datasets that ship without split files."""

from __future__ import annotations

import hashlib

from imcap.errors import ImcapError


def split_of(image_name: str, ratios: dict[str, float], seed: int = 0) -> str:
    """Split for one image from a hash of its name: stable under reordering and additions."""
    total = sum(ratios.values())
    if total <= 0 or any(r < 0 for r in ratios.values()):
        raise ImcapError(f"split ratios must be non-negative and sum above 0; got {ratios}")
    digest = hashlib.sha256(f"{seed}:{image_name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64 * total
    acc = 0.0
    for split, ratio in ratios.items():
        acc += ratio
        if u < acc:
            return split
    return next(reversed(ratios))
