"""CaptionRecord, the one record every reader yields: immutable, compared without its extras."""

from __future__ import annotations

import dataclasses

import pytest

from imcap.data.records import SPLITS, CaptionRecord


def record(**extra) -> CaptionRecord:
    return CaptionRecord("img1", "/data/img1.jpg", ("a dog", "a brown dog"), "train", extra)


def test_a_record_cannot_be_changed_after_a_reader_made_it():
    with pytest.raises(dataclasses.FrozenInstanceError):
        record().captions = ("other",)


def test_extras_take_no_part_in_equality_or_hashing():
    boxes = record(boxes=[[0, 0, 4, 4]])
    assert boxes == record() and hash(boxes) == hash(record())
    assert len({boxes, record()}) == 1  # the same image and captions count once
    assert record() != CaptionRecord("img1", "/data/img1.jpg", ("a dog",), "train")
    assert record().extra == {} and record().extra is not record().extra  # no shared default


def test_the_splits_readers_assign():
    assert SPLITS == ("train", "val", "test")
