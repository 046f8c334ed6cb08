"""Karpathy split files: their splits, restval, and entries that are not what they should be."""

from __future__ import annotations

import json

import pytest

from imcap.data.sources.karpathy import read_karpathy
from imcap.errors import ImcapError
from tests.helpers.images import write_image


def test_splits_restval_and_whether_each_image_is_there(tmp_path):
    entries = [{"filepath": "val2014", "filename": f"{i}.jpg", "cocoid": i, "split": split,
                "sentences": [{"raw": f" picture {i} "}]} for i, split in enumerate(["train", "restval", "test"])]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    write_image(tmp_path / "val2014" / "0.jpg")
    pairs = read_karpathy(tmp_path / "dataset_coco.json", tmp_path, restval_to="val")
    assert [(r.image_id, r.split, r.captions, exists) for r, exists in pairs] == [
        (0, "train", ("picture 0",), True), (1, "val", ("picture 1",), False), (2, "test", ("picture 2",), False)]
    assert pairs[0][0].image_path == str(tmp_path / "val2014" / "0.jpg")


def test_a_file_that_is_not_a_karpathy_split_is_a_user_error(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ImcapError, match="not a Karpathy split file"):
        read_karpathy(tmp_path / "x.json", tmp_path)
    (tmp_path / "x.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train"}]}))
    with pytest.raises(ImcapError, match="image entry 0 lacks 'sentences'"):
        read_karpathy(tmp_path / "x.json", tmp_path)
