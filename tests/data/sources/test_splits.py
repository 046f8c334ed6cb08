"""Hashed per-image splits: stable, close to the ratios, and checked."""

from __future__ import annotations

from collections import Counter

import pytest

from imcap.data.sources.splits import split_of
from imcap.errors import ImcapError

RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}


def test_an_image_keeps_its_split_whatever_else_is_in_the_dataset():
    names = [f"{i}.jpg" for i in range(2000)]
    first = {n: split_of(n, RATIOS) for n in names}
    assert {n: split_of(n, RATIOS) for n in reversed(names + ["new.jpg"]) if n != "new.jpg"} == first
    counts = Counter(first.values())
    assert 1500 < counts["train"] < 1700 and 130 < counts["val"] < 270 and 130 < counts["test"] < 270
    assert Counter(split_of(n, RATIOS, seed=1) for n in names) != counts  # the seed draws another split


def test_a_zero_ratio_split_gets_no_images_and_bad_ratios_are_refused():
    assert {split_of(f"{i}", {"train": 1, "val": 0}) for i in range(200)} == {"train"}
    with pytest.raises(ImcapError, match="split ratios must be non-negative"):
        split_of("a.jpg", {"train": 1, "val": -0.5})
    with pytest.raises(ImcapError, match="sum above 0"):
        split_of("a.jpg", {"train": 0})
