"""Where the checkout, its configs and the shared real data are."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"
FLICKR_1K = SHARED_DATA / "flickr8k-1k"
