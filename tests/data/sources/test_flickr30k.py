import json

import pytest

from imcap.data.records import SPLITS
from imcap.data.sources.flickr30k import Flickr30kSource, read_kaggle_results
from imcap.errors import ImcapError
from tests.helpers.images import write_image

# The Kaggle file as it is: spaces after every '|', in the header too.
HEADER = "image_name| comment_number| comment\n"


def _kaggle(root, rows, images=("1.jpg", "2.jpg")):
    """The Kaggle zip's layout: results.csv beside the doubly nested image folder."""
    folder = root / "flickr30k_images"
    for name in images:
        write_image(folder / "flickr30k_images" / name)
    (folder / "results.csv").write_text(HEADER + "".join(rows))
    return folder / "results.csv"


def test_kaggle_layout_nested_folder_stray_spaces_and_merged_row(tmp_path, caplog):
    _kaggle(tmp_path, [
        "1.jpg| 0| A dog runs .\n",
        "1.jpg| 1| A dog | a cat .\n",  # a '|' inside the comment stays in it
        "1.jpg| 2 A dog runs across the grass .\n",  # the real file's merged row
        "2.jpg|3 |  Two  people .  \n",
        "\n",
    ])
    records = {r.image_id: r for r in Flickr30kSource(str(tmp_path)).records()}
    assert records["1.jpg"].captions == ("A dog runs .", "A dog | a cat .", "A dog runs across the grass .")
    assert records["2.jpg"].captions == ("Two  people .",)
    assert records["1.jpg"].image_path == str(tmp_path / "flickr30k_images" / "flickr30k_images" / "1.jpg")
    assert {r.split for r in records.values()} <= set(SPLITS)
    assert "Repaired 1 rows" in caplog.text and "(lines 4)" in caplog.text


def test_bad_rows_error_names_file_and_line(tmp_path):
    path = _kaggle(tmp_path, ["1.jpg| 0| ok\n", "1.jpg| 1 merged comment .\n"])
    with pytest.raises(ImcapError, match=r"results.csv:3: the comment is merged .*bad_rows=repair"):
        Flickr30kSource(str(tmp_path), bad_rows="error").records()
    path.write_text(HEADER + "1.jpg| 0| ok\n2.jpg| x| not a number\n")
    with pytest.raises(ImcapError, match=r"results.csv:3: comment_number 'x' is not a number.*bad_rows=skip"):
        Flickr30kSource(str(tmp_path)).records()  # repair cannot fix this row: it stops


def test_bad_rows_skip_counts_and_reports(tmp_path, caplog):
    path = _kaggle(tmp_path, ["1.jpg| 0| ok\n", "2.jpg| 0|\n", "| 0| no image\n", "2.jpg| 1 merged .\n",
                              "2.jpg| 2| fine\n"])
    captions = read_kaggle_results(path, bad_rows="skip")
    assert dict(captions) == {"1.jpg": ["ok"], "2.jpg": ["fine"]}
    assert "Skipped 3 broken rows" in caplog.text and "first: line 3, empty comment" in caplog.text


def test_wrong_header_and_bad_encoding_name_the_line(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("image,caption\n1.jpg,x\n")
    with pytest.raises(ImcapError, match=r"results.csv:1: expected the header"):
        read_kaggle_results(path)
    path.write_bytes(HEADER.encode() + b"1.jpg| 0| ok\n1.jpg| 1| caf\xe9\n")
    with pytest.raises(ImcapError, match=r"results.csv:3: not UTF-8"):
        read_kaggle_results(path)
    with pytest.raises(ImcapError, match="data.source.bad_rows='fix'"):
        Flickr30kSource(str(tmp_path), bad_rows="fix")


def test_official_token_file_with_hyphenated_image_folder(tmp_path):
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        write_image(tmp_path / "flickr30k-images" / name)
    (tmp_path / "results_20130124.token").write_text(
        "".join(f"{n}#{k}\tcaption {k} of {n}\n" for n in ("1.jpg", "2.jpg", "3.jpg") for k in range(5)))
    records = Flickr30kSource(str(tmp_path)).records()
    assert [len(r.captions) for r in records] == [5, 5, 5]
    assert records[0].image_path.endswith("flickr30k-images/1.jpg")
    assert Flickr30kSource(str(tmp_path)).records() == records  # the hashed split is deterministic


def test_karpathy_file_wins_and_sets_the_splits(tmp_path):
    _kaggle(tmp_path, ["1.jpg| 0| from the csv\n"])
    entries = [{"filename": f"{i}.jpg", "imgid": i, "split": s, "sentences": [{"raw": f"caption {i}"}]}
               for i, s in ((1, "test"), (2, "train"))]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    records = Flickr30kSource(str(tmp_path)).records()
    assert [(r.image_id, r.split, r.captions) for r in records] == [(1, "test", ("caption 1",)),
                                                                     (2, "train", ("caption 2",))]
    assert records[1].image_path == str(tmp_path / "flickr30k_images" / "flickr30k_images" / "2.jpg")


def test_missing_images_error_or_are_skipped_and_counted(tmp_path, caplog):
    _kaggle(tmp_path, ["1.jpg| 0| a\n", "3.jpg| 0| b\n"], images=("1.jpg",))
    with pytest.raises(ImcapError, match="1 Flickr30k images named in .*results.csv are missing .*3.jpg"):
        Flickr30kSource(str(tmp_path)).records()
    records = Flickr30kSource(str(tmp_path), missing_images="skip").records()
    assert [r.image_id for r in records] == ["1.jpg"]
    assert "Skipped 1 of 2 Flickr30k images" in caplog.text


def test_missing_root_or_captions_say_what_to_place(tmp_path):
    with pytest.raises(ImcapError, match="data.root=.*does not exist.*`make data dataset=flickr30k root="):
        Flickr30kSource(str(tmp_path / "nope")).records()
    with pytest.raises(ImcapError, match="no Flickr30k captions.*results.csv"):
        Flickr30kSource(str(tmp_path)).records()
