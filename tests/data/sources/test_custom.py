import json
import os

import pytest

from imcap.data.records import SPLITS
from imcap.data.sources.custom import CustomSource
from imcap.errors import ImcapError
from tests.helpers.images import write_image


def test_csv_rows_grouped_per_image_headers_matched_loosely(tmp_path):
    for name in ("a.jpg", "dogs/b.png"):
        write_image(tmp_path / name)
    (tmp_path / "captions.csv").write_text(
        ' Image ,CAPTION, Split\n'
        'a.jpg,"A dog, wet",train\n'
        './a.jpg,A wet dog,train\n'  # the same file spelt differently joins the same image
        'dogs/b.png,Two dogs,Validation\n'
        '\n'
    )
    records = CustomSource(str(tmp_path)).records()
    assert [(r.image_id, r.captions, r.split) for r in records] == [
        ("a.jpg", ("A dog, wet", "A wet dog"), "train"), ("dogs/b.png", ("Two dogs",), "val")]
    assert records[1].image_path == str((tmp_path / "dogs" / "b.png").resolve())


def test_tsv_without_split_column_is_split_by_hash(tmp_path):
    names = [f"{i}.jpg" for i in range(30)]
    for name in names:
        write_image(tmp_path / "img" / name)
    (tmp_path / "list.tsv").write_text("image\tcaption\n" + "".join(f"img/{n}\tcaption of {n}\n" for n in names))
    records = CustomSource(str(tmp_path), captions="list.tsv").records()
    splits = [r.split for r in records]
    assert len(records) == 30 and set(splits) <= set(SPLITS) and splits.count("train") > 15
    assert CustomSource(str(tmp_path), captions="list.tsv").records() == records


def test_jsonl_with_caption_lists(tmp_path):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "b.jpg")
    lines = [{"Image": "a.jpg", "caption": ["one", "two"], "split": "test"},
             {"image": "b.jpg", "caption": "three", "split": "train"},
             {"image": "a.jpg", "caption": "four", "split": "test"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = CustomSource(str(tmp_path)).records()
    assert [(r.image_id, r.captions, r.split) for r in records] == [
        ("a.jpg", ("one", "two", "four"), "test"), ("b.jpg", ("three",), "train")]


@pytest.mark.parametrize("rows,message", [
    ("picture,caption\na.jpg,x\n", r"captions.csv:1: no 'image' column"),
    ("image,caption\na.jpg,x,extra\n", r"captions.csv:2: 3 cells for 2 columns"),
    ("image,caption\na.jpg,\n", r"captions.csv:2: empty caption"),
    ("image,caption,split\na.jpg,x,train\na.jpg,y,test\n", r"captions.csv:3: 'a.jpg' is in split 'test' here but 'train' at .*captions.csv:2"),
    ("image,caption,split\na.jpg,x,holdout\n", r"captions.csv:2: split 'holdout'"),
    ("image,caption,split\na.jpg,x,\n", r"captions.csv:2: empty split cell"),
])
def test_bad_rows_name_file_and_line(tmp_path, rows, message):
    write_image(tmp_path / "a.jpg")
    (tmp_path / "captions.csv").write_text(rows)
    with pytest.raises(ImcapError, match=message):
        CustomSource(str(tmp_path)).records()


def test_paths_leaving_the_root_are_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_image(outside / "secret.jpg")
    write_image(root / "ok.jpg")
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    for image in ("../outside/secret.jpg", str(outside / "secret.jpg"), "link.jpg", "sub/../../outside/secret.jpg"):
        (root / "captions.csv").write_text(f"image,caption\nok.jpg,fine\n{image},x\n")
        with pytest.raises(ImcapError, match=r"captions.csv:3: image .* outside data.root"):
            CustomSource(str(root)).records()
    # inside the root, absolute paths and '..' that stay inside are fine
    (root / "captions.csv").write_text(f"image,caption\n{root / 'ok.jpg'},fine\nsub/../ok.jpg,also\n")
    (record,) = CustomSource(str(root)).records()
    assert record.captions == ("fine", "also")


def test_missing_images_error_or_are_skipped_and_counted(tmp_path, caplog):
    write_image(tmp_path / "a.jpg")
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,x\nb.jpg,y\n")
    with pytest.raises(ImcapError, match="1 custom images named in .*captions.csv are missing .*b.jpg"):
        CustomSource(str(tmp_path)).records()
    assert [r.image_id for r in CustomSource(str(tmp_path), missing_images="skip").records()] == ["a.jpg"]
    assert "Skipped 1 of 2 custom images" in caplog.text


def test_folder_of_images_with_sidecars(tmp_path, caplog):
    write_image(tmp_path / "train" / "a.jpg")
    (tmp_path / "train" / "a.txt").write_text("a red car\n\nA car parked .\n")
    write_image(tmp_path / "misc" / "b.PNG")
    (tmp_path / "misc" / "b.txt").write_text("a tree\n")
    write_image(tmp_path / "test" / "c.jpg")
    (tmp_path / "test" / "c.txt").write_text("a boat\n")
    write_image(tmp_path / "no_caption.jpg")  # reported, not silently dropped
    write_image(tmp_path / ".imcap-features" / "ignored.jpg")
    records = {r.image_id: r for r in CustomSource(str(tmp_path)).records()}
    assert set(records) == {"train/a.jpg", "misc/b.PNG", "test/c.jpg"}
    assert records["train/a.jpg"].captions == ("a red car", "A car parked .")
    assert (records["train/a.jpg"].split, records["test/c.jpg"].split) == ("train", "test")
    assert records["misc/b.PNG"].split in SPLITS
    assert "Left out 1 of 4 images" in caplog.text and "no_caption.jpg" in caplog.text


def test_sidecar_without_image_and_escaping_symlink(tmp_path, caplog):
    write_image(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "gone.txt").write_text("y\n")
    with pytest.raises(ImcapError, match="1 .txt sidecars .* no image beside them .*gone.txt"):
        CustomSource(str(tmp_path)).records()
    assert len(CustomSource(str(tmp_path), missing_images="skip").records()) == 1
    assert "Skipped 1 .txt sidecars" in caplog.text
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    write_image(outside / "z.jpg")
    (outside / "z.txt").write_text("z\n")
    os.symlink(outside, tmp_path / "linked")
    with pytest.raises(ImcapError, match="linked is a symlink to .* outside data.root"):
        CustomSource(str(tmp_path), missing_images="skip").records()


def test_configuration_mistakes(tmp_path):
    with pytest.raises(ImcapError, match="data.root=.*does not exist"):
        CustomSource(str(tmp_path / "nope")).records()
    with pytest.raises(ImcapError, match="data.source.captions=c.xlsx: unknown format"):
        CustomSource(str(tmp_path), captions="c.xlsx").records()
    with pytest.raises(ImcapError, match=r"data.source.captions=c.csv: .* does not exist"):
        CustomSource(str(tmp_path), captions="c.csv").records()
    with pytest.raises(ImcapError, match="no captioned images under"):
        CustomSource(str(tmp_path)).records()
    (tmp_path / "captions.csv").write_text("image,caption\n")
    (tmp_path / "captions.jsonl").write_text("")
    with pytest.raises(ImcapError, match="several captions files"):
        CustomSource(str(tmp_path)).records()
    with pytest.raises(ImcapError, match="missing_images='maybe'"):
        CustomSource(str(tmp_path), missing_images="maybe")
