import hashlib

import pytest

from imcap.data.sources.shapes import COLORS, SHAPES, ShapesSource
from imcap.errors import ImcapError

SIZES = {"train": 12, "val": 4, "test": 4}


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_across_folders(tmp_path):
    a = ShapesSource(str(tmp_path / "a"), SIZES, image_size=64)
    b = ShapesSource(str(tmp_path / "b"), SIZES, image_size=64)
    a.prepare()
    b.prepare()
    assert _digest(a.folder) == _digest(b.folder)


def test_records_have_splits_five_captions_and_boxes(tmp_path):
    source = ShapesSource(str(tmp_path), SIZES, image_size=64)
    source.prepare()
    records = source.records()
    assert {s: sum(r.split == s for r in records) for s in SIZES} == SIZES
    for r in records:
        assert len(r.captions) == len(set(r.captions)) == 5
        objects = r.extra["objects"]
        assert 1 <= len(objects) <= 3
        for o in objects:
            assert o["color"] in COLORS and o["shape"] in SHAPES
            assert f"{o['color']} {o['shape']}" in r.captions[0] or f"{o['color']} {o['shape']}" in r.captions[4]
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_second_prepare_reuses_the_cache(tmp_path):
    source = ShapesSource(str(tmp_path), SIZES, image_size=64)
    source.prepare()
    stamp = (source.folder / "annotations.json").stat().st_mtime_ns
    source.prepare()
    assert (source.folder / "annotations.json").stat().st_mtime_ns == stamp


def test_other_parameters_get_another_folder(tmp_path):
    assert ShapesSource(str(tmp_path), SIZES, seed=0).folder != ShapesSource(str(tmp_path), SIZES, seed=1).folder


def test_two_object_captions_state_the_relation(tmp_path):
    source = ShapesSource(str(tmp_path), {"train": 40}, image_size=64)
    source.prepare()
    pairs = [r for r in source.records() if len(r.extra["objects"]) == 2]
    assert pairs
    for r in pairs:
        assert any(rel in r.captions[0] for rel in ("left of", "right of", "above", "below"))


def test_bad_parameters_are_user_errors(tmp_path):
    with pytest.raises(ImcapError, match="num_images"):
        ShapesSource(str(tmp_path), {"training": 3})
    with pytest.raises(ImcapError, match="max_objects"):
        ShapesSource(str(tmp_path), max_objects=4)
