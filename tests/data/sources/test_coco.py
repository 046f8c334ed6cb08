import json

import pytest

from imcap.data.sources.coco import CocoSource
from imcap.errors import ImcapError
from tests.helpers.coco import write_official
from tests.helpers.images import write_image
from tests.helpers.paths import ROOT
from tests.helpers.runs import assert_one_line_error, module, run


def test_official_files_train_and_val_split_in_half(tmp_path):
    write_official(tmp_path, "train", [1, 2, 3])
    write_official(tmp_path, "val", list(range(100, 140)))
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
        write_image(tmp_path / folder / f"{i}.jpg")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    records = CocoSource(str(tmp_path)).records()
    assert [(r.image_id, r.split) for r in records] == [(0, "train"), (1, "train"), (2, "val"), (3, "test")]
    assert records[2].image_path.endswith("val2014/2.jpg")


def test_missing_images_and_bad_files_are_user_errors(tmp_path):
    write_official(tmp_path, "train", [1, 2])
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
    write_official(tmp_path, "train", [1, 2], year=2017)
    write_official(tmp_path, "val", [100, 101], year=2017)
    source = CocoSource(str(tmp_path))
    assert source.year == 2017
    assert all("train2017/" in r.image_path or "val2017/" in r.image_path for r in source.records())
    assert len(source.records()) == 4


def test_both_years_on_disk_ask_for_one_in_one_line(tmp_path):
    write_official(tmp_path, "train", [1], year=2014)
    write_official(tmp_path, "train", [2], year=2017)
    with pytest.raises(ImcapError, match=r"^COCO 2014 and 2017 are both under data.root=.*; choose one with "
                                         r"data.source.year=2014 or data.source.year=2017$"):
        CocoSource(str(tmp_path)).records()
    (record,) = CocoSource(str(tmp_path), year=2017).records()  # naming the year settles it
    assert record.image_id == 2


def test_the_karpathy_file_counts_as_2014(tmp_path):
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": []}))
    assert CocoSource(str(tmp_path)).year == 2014
    write_official(tmp_path, "train", [2], year=2017)
    with pytest.raises(ImcapError, match="COCO 2014 and 2017 are both under"):
        CocoSource(str(tmp_path)).prepare()


def test_a_missing_root_or_year_names_the_command_that_fetches_it(tmp_path):
    with pytest.raises(ImcapError, match=rf"data.root={tmp_path}/none does not exist: .*"
                                         rf"`make data dataset=coco root={tmp_path}/none`"):
        CocoSource(str(tmp_path / "none")).prepare()
    write_official(tmp_path, "train", [1], year=2014)
    with pytest.raises(ImcapError, match=r"no COCO 2017 captions .*annotations/captions_train2017.json.*"
                                         r'`make data dataset=coco root=.* ARGS="data.source.year=2017"`'):
        CocoSource(str(tmp_path), year=2017).prepare()


@pytest.mark.slow
def test_a_coco_2017_root_trains_given_only_its_root_and_both_years_ask_for_one(tmp_path):
    """As a new user runs it: `make train dataset=coco root=DIR` on a COCO 2017 download."""
    root = tmp_path / "coco"
    words = ["a red square on grass", "a small red square", "red square near a tree", "a square that is red",
             "one red square"]
    write_official(root, "train", range(1, 9), year=2017, size=32, captions=words)
    write_official(root, "val", range(100, 112), year=2017, size=32, captions=words)
    result = run("make", "-C", str(ROOT), "train", "dataset=coco", f"root={root}",
                 "ARGS=debug=fast_dev_run callbacks.progress_bar=null", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Data coco under data.root=" in result.stderr and "train=8" in result.stderr

    write_official(root, "train", [1], year=2014)  # a 2014 download next to it
    both = module("train", "data=coco", f"data.root={root}", "debug=fast_dev_run", cwd=tmp_path)
    assert both.returncode == 2
    assert_one_line_error(both, f"error: COCO 2014 and 2017 are both under data.root={root}; choose one with "
                                "data.source.year=2014 or data.source.year=2017")
    assert len(both.stderr.strip().splitlines()) == 1


def test_an_image_id_listed_twice_is_one_line_naming_the_file_and_the_id(tmp_path):
    """Two photos under one id: their captions would silently go to one of them."""
    root = tmp_path / "coco"
    path = write_official(root, "train", [1, 2, 3])
    data = json.loads(path.read_text())
    data["images"][2]["id"] = 2  # the third image (id 3) now claims id 2 too
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 3]
    path.write_text(json.dumps(data))
    result = module("train", "data=coco", f"data.root={root}", "debug=fast_dev_run", cwd=tmp_path)
    assert_one_line_error(result, f"error: {path}: image id 2 is listed twice in 'images', as "
                                  "'COCO_train2014_000000000002.jpg' and 'COCO_train2014_000000000003.jpg'")
    assert len(result.stderr.strip().splitlines()) == 1

    data["images"][2]["file_name"] = data["images"][1]["file_name"]  # the same entry twice: nothing is ambiguous
    path.write_text(json.dumps(data))
    assert [r.image_id for r in CocoSource(str(root)).records()] == [1, 2]
