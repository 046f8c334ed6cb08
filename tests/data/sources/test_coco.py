import json

import pytest
from PIL import Image

from imcap.data.sources.coco import CocoSource
from imcap.data.sources.flickr8k import Flickr8kSource
from imcap.errors import ImcapError


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def _official(root, part, ids, year=2014):
    images = [{"id": i, "file_name": f"COCO_{part}{year}_{i:012d}.jpg"} for i in ids]
    anns = [{"id": 10 * i + k, "image_id": i, "caption": f"caption {k} of {i} "} for i in ids for k in range(5)]
    path = root / "annotations" / f"captions_{part}{year}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    for im in images:
        _image(root / f"{part}{year}" / im["file_name"])


def test_official_files_train_and_val_split_in_half(tmp_path):
    _official(tmp_path, "train", [1, 2, 3])
    _official(tmp_path, "val", list(range(100, 140)))
    records = CocoSource(str(tmp_path)).records()
    splits = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
    assert [r.image_id for r in splits["train"]] == [1, 2, 3]
    assert 10 <= len(splits["val"]) <= 30 and len(splits["val"]) + len(splits["test"]) == 40
    assert records[0].captions[0] == "caption 0 of 1" and len(records[0].captions) == 5
    assert CocoSource(str(tmp_path)).records() == records  # deterministic


def test_karpathy_file_wins_and_restval_joins_train(tmp_path):
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        folder = "train2014" if split == "train" else "val2014"
        entries.append({"filepath": folder, "filename": f"{i}.jpg", "cocoid": i, "split": split,
                        "sentences": [{"raw": f"A picture {i}."}]})
        _image(tmp_path / folder / f"{i}.jpg")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    records = CocoSource(str(tmp_path)).records()
    assert [(r.image_id, r.split) for r in records] == [(0, "train"), (1, "train"), (2, "val"), (3, "test")]
    assert records[2].image_path.endswith("val2014/2.jpg")


def test_karpathy_flickr8k_file_is_read(tmp_path):
    _image(tmp_path / "Flicker8k_Dataset" / "a.jpg")
    entry = {"filename": "a.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "a dog"}]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": [entry]}))
    (record,) = Flickr8kSource(str(tmp_path)).records()
    assert (record.split, record.captions) == ("test", ("a dog",))


def test_karpathy_flickr8k_skips_missing_images_and_counts_them_once(tmp_path, caplog):
    _image(tmp_path / "Flicker8k_Dataset" / "a.jpg")
    entries = [{"filename": name, "imgid": i, "split": "train", "sentences": [{"raw": "a dog"}]}
               for i, name in enumerate(["a.jpg", "b.jpg"])]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    with pytest.raises(ImcapError, match="1 Flickr8k images .* missing .*b.jpg"):
        Flickr8kSource(str(tmp_path)).records()
    records = Flickr8kSource(str(tmp_path), missing_images="skip").records()
    assert [r.image_path.rsplit("/", 1)[-1] for r in records] == ["a.jpg"]
    assert "Skipped 1 of 2 Flickr8k images" in caplog.text


def test_missing_images_and_bad_files_are_user_errors(tmp_path):
    _official(tmp_path, "train", [1, 2])
    (tmp_path / "train2014" / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(ImcapError, match="1 COCO images are missing"):
        CocoSource(str(tmp_path)).records()
    assert len(CocoSource(str(tmp_path), missing_images="skip").records()) == 1
    (tmp_path / "annotations" / "captions_train2014.json").write_text("{}")
    with pytest.raises(ImcapError, match="not a COCO captions file"):
        CocoSource(str(tmp_path)).records()
    with pytest.raises(ImcapError, match="does not exist"):
        CocoSource(str(tmp_path / "none")).prepare()


def test_the_year_on_disk_is_read_without_being_named(tmp_path):
    _official(tmp_path, "train", [1, 2], year=2017)
    _official(tmp_path, "val", [100, 101], year=2017)
    source = CocoSource(str(tmp_path))
    assert source.year == 2017
    assert all("train2017/" in r.image_path or "val2017/" in r.image_path for r in source.records())
    assert len(source.records()) == 4


def test_both_years_on_disk_ask_for_one_in_one_line(tmp_path):
    _official(tmp_path, "train", [1], year=2014)
    _official(tmp_path, "train", [2], year=2017)
    with pytest.raises(ImcapError, match=r"^COCO 2014 and 2017 are both under data.root=.*; choose one with "
                                         r"data.source.year=2014 or data.source.year=2017$"):
        CocoSource(str(tmp_path)).records()
    (record,) = CocoSource(str(tmp_path), year=2017).records()  # naming the year settles it
    assert record.image_id == 2


def test_the_karpathy_file_counts_as_2014(tmp_path):
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": []}))
    assert CocoSource(str(tmp_path)).year == 2014
    _official(tmp_path, "train", [2], year=2017)
    with pytest.raises(ImcapError, match="COCO 2014 and 2017 are both under"):
        CocoSource(str(tmp_path)).prepare()


def test_a_missing_root_or_year_names_the_command_that_fetches_it(tmp_path):
    with pytest.raises(ImcapError, match=rf"data.root={tmp_path}/none does not exist: .*"
                                         rf"`make data dataset=coco root={tmp_path}/none`"):
        CocoSource(str(tmp_path / "none")).prepare()
    _official(tmp_path, "train", [1], year=2014)
    with pytest.raises(ImcapError, match=r"no COCO 2017 captions .*annotations/captions_train2017.json.*"
                                         r'`make data dataset=coco root=.* ARGS="data.source.year=2017"`'):
        CocoSource(str(tmp_path), year=2017).prepare()
