import json

import pytest

from imcap.data.sources.flickr8k import Flickr8kSource
from imcap.errors import ImcapError
from tests.helpers.images import write_image
from tests.helpers.paths import FLICKR_1K


def test_kaggle_layout_with_quoted_commas(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / "Images" / name)
    (tmp_path / "captions.txt").write_text(
        'image,caption\na.jpg,"A dog, wet, runs ."\na.jpg,A dog runs\nb.jpg,Two cats\n'
    )
    records = {r.image_id: r for r in Flickr8kSource(str(tmp_path)).records()}
    assert records["a.jpg"].captions == ("A dog, wet, runs .", "A dog runs")
    assert records["b.jpg"].image_path.endswith("Images/b.jpg")


def test_official_layout_uses_split_files(tmp_path):
    names = ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    for n in names:
        write_image(tmp_path / "Flicker8k_Dataset" / n)
    (tmp_path / "Flickr8k.token.txt").write_text("".join(f"{n}#{k}\tcaption {k} of {n}\n" for n in names for k in range(5)))
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("1.jpg\n2.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("3.jpg\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("4.jpg\n")
    records = {r.image_id: r for r in Flickr8kSource(str(tmp_path)).records()}
    assert {k: r.split for k, r in records.items()} == {"1.jpg": "train", "2.jpg": "train", "3.jpg": "val", "4.jpg": "test"}
    assert len(records["1.jpg"].captions) == 5


def test_missing_root_names_the_option(tmp_path):
    with pytest.raises(ImcapError, match="data.root=.*does not exist.*`make data dataset=flickr8k root="):
        Flickr8kSource(str(tmp_path / "nope")).prepare()


def test_malformed_token_line_names_file_and_line(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text("1.jpg#0\tok\nbroken line\n")
    with pytest.raises(ImcapError, match=r"Flickr8k.token.txt:2"):
        Flickr8kSource(str(tmp_path)).records()


def test_missing_images_error_or_are_skipped_and_counted(tmp_path, caplog):
    write_image(tmp_path / "Images" / "a.jpg")
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,x\nb.jpg,y\n")
    with pytest.raises(ImcapError, match="1 Flickr8k images .* missing"):
        Flickr8kSource(str(tmp_path)).records()
    records = Flickr8kSource(str(tmp_path), missing_images="skip").records()
    assert [r.image_id for r in records] == ["a.jpg"]
    assert "Skipped 1 of 2" in caplog.text


@pytest.mark.realdata
def test_reads_the_real_kaggle_subset():
    records = Flickr8kSource(str(FLICKR_1K)).records()
    assert len(records) == 1000
    assert sum(len(r.captions) for r in records) == 5000
    splits = {s: sum(r.split == s for r in records) for s in ("train", "val", "test")}
    assert 700 < splits["train"] < 900 and splits["val"] > 50 and splits["test"] > 50


def test_karpathy_flickr8k_file_is_read(tmp_path):
    write_image(tmp_path / "Flicker8k_Dataset" / "a.jpg")
    entry = {"filename": "a.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "a dog"}]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": [entry]}))
    (record,) = Flickr8kSource(str(tmp_path)).records()
    assert (record.split, record.captions) == ("test", ("a dog",))


def test_karpathy_flickr8k_skips_missing_images_and_counts_them_once(tmp_path, caplog):
    write_image(tmp_path / "Flicker8k_Dataset" / "a.jpg")
    entries = [{"filename": name, "imgid": i, "split": "train", "sentences": [{"raw": "a dog"}]}
               for i, name in enumerate(["a.jpg", "b.jpg"])]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    with pytest.raises(ImcapError, match="1 Flickr8k images .* missing .*b.jpg"):
        Flickr8kSource(str(tmp_path)).records()
    records = Flickr8kSource(str(tmp_path), missing_images="skip").records()
    assert [r.image_path.rsplit("/", 1)[-1] for r in records] == ["a.jpg"]
    assert "Skipped 1 of 2 Flickr8k images" in caplog.text


def test_a_checkpoint_naming_the_reader_before_its_rename_still_loads(tmp_path):
    import torch

    from imcap.models.captioner import CHECKPOINT_KEY, load_checkpoint

    data = {"_target_": "imcap.data.datamodule.CaptionDataModule",
            "source": {"_target_": "imcap.data.sources.flickr.Flickr8kSource", "root": str(tmp_path)}}
    torch.save({CHECKPOINT_KEY: {"architecture": {}, "vocab": ["<pad>"], "data": data}, "state_dict": {}},
               tmp_path / "old.ckpt")
    stored = load_checkpoint(tmp_path / "old.ckpt")[CHECKPOINT_KEY]["data"]
    assert stored["source"]["_target_"] == "imcap.data.sources.flickr8k.Flickr8kSource"
