"""Caption and annotation files as users hand them over: NUL bytes, an oversized CSV field, text
that is not UTF-8, non-string captions in JSON. Each is one line naming the file and line (or
the JSON entry), never a traceback; and every text file imcap opens names its encoding."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from imcap.data.sources.coco import CocoSource
from imcap.data.sources.custom import CustomSource
from imcap.data.sources.flickr8k import Flickr8kSource
from imcap.data.sources.flickr30k import Flickr30kSource
from imcap.errors import ImcapError

ROOT = Path(__file__).resolve().parents[2]


def custom_csv(root, body: bytes):
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    (root / "captions.csv").write_bytes(b"image,caption\na.jpg,a dog runs\n" + body)
    return CustomSource(str(root)), "captions.csv:3"


def custom_jsonl(root, body: bytes):
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    (root / "captions.jsonl").write_bytes(b'{"image": "a.jpg", "caption": "a dog"}\n' + body)
    return CustomSource(str(root)), "captions.jsonl:2"


def custom_sidecar(root, body: bytes):
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    (root / "a.txt").write_bytes(b"a dog runs\n" + body)
    return CustomSource(str(root)), "a.txt:2"


def flickr_kaggle(root, body: bytes):
    (root / "Images").mkdir()
    (root / "captions.txt").write_bytes(b"image,caption\na.jpg,a dog runs\n" + body)
    return Flickr8kSource(str(root)), "captions.txt:3"


def flickr_tokens(root, body: bytes):
    (root / "Flicker8k_Dataset").mkdir()
    (root / "Flickr8k.token.txt").write_bytes(b"a.jpg#0\ta dog runs\n" + body.replace(b",", b"#0\t", 1))
    return Flickr8kSource(str(root)), "Flickr8k.token.txt:2"


def flickr30k_results(root, body: bytes):
    (root / "flickr30k_images").mkdir()
    (root / "results.csv").write_bytes(b"image_name| comment_number| comment\na.jpg| 0| a dog\n"
                                       + body.replace(b",", b"| 0| ", 1))
    return Flickr30kSource(str(root)), "results.csv:3"


LINE_FORMATS = [custom_csv, flickr_kaggle, flickr_tokens, flickr30k_results]


def one_line_error(source, match: str) -> str:
    with pytest.raises(ImcapError, match=match) as e:
        source.records()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("layout", [*LINE_FORMATS, custom_jsonl, custom_sidecar])
def test_a_nul_byte_is_one_line_naming_file_and_line(tmp_path, layout):
    body = b'{"image": "a.jpg", "caption": "b\x00d"}\n' if layout is custom_jsonl else b"b.jpg,a c\x00t\n"
    source, name = layout(tmp_path, body)
    one_line_error(source, rf"{re.escape(str(tmp_path / name))}: a NUL byte; the file is binary or damaged")


@pytest.mark.parametrize("layout", [custom_csv, flickr_kaggle])
def test_a_csv_field_over_128_kib_is_one_line_naming_file_and_line(tmp_path, layout):
    source, name = layout(tmp_path, b'b.jpg,"' + b"x" * (130 << 10) + b'"\n')
    one_line_error(source, rf"{re.escape(str(tmp_path / name))}: field larger than field limit \(131072\)")


@pytest.mark.parametrize("layout", [*LINE_FORMATS, custom_jsonl, custom_sidecar])
def test_text_that_is_not_utf8_is_one_line_naming_file_and_line(tmp_path, layout):
    latin1 = "a café by the river".encode("latin-1")
    body = b'{"image": "a.jpg", "caption": "' + latin1 + b'"}\n' if layout is custom_jsonl else b"b.jpg," + latin1 + b"\n"
    source, name = layout(tmp_path, body)
    one_line_error(source, rf"{re.escape(str(tmp_path / name))}: not UTF-8 \(.*\); re-save the file as UTF-8")


def test_a_split_file_that_is_not_utf8_is_one_line(tmp_path):
    source, _ = flickr_tokens(tmp_path, b"")
    (tmp_path / "Flickr_8k.trainImages.txt").write_bytes(b"a.jpg\n\xff.jpg\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "Flicker8k_Dataset" / "a.jpg")
    one_line_error(source, r"Flickr_8k.trainImages.txt:2: not UTF-8")


def test_utf8_with_a_byte_order_mark_and_crlf_still_reads(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "captions.csv").write_bytes("\ufeffimage,caption\r\na.jpg,un café\r\n".encode())
    [record] = CustomSource(str(tmp_path)).records()
    assert record.captions == ("un café",)


def coco_official(root, caption):
    (root / "annotations").mkdir()
    images = [{"id": 1, "file_name": "a.jpg"}]
    data = {"images": images, "annotations": [{"image_id": 1, "caption": "a dog"}, {"image_id": 1, "caption": caption}]}
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps(data), encoding="utf-8")
    return CocoSource(str(root)), r"captions_train2014.json: annotation 1 \(image id 1\): caption must be a string"


def coco_karpathy(root, caption):
    items = [{"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 1,
              "sentences": [{"raw": "a dog"}, {"raw": caption}]}]
    (root / "dataset_coco.json").write_text(json.dumps({"images": items}), encoding="utf-8")
    return CocoSource(str(root)), r"dataset_coco.json: image entry 0, sentence 1: raw must be a string"


def custom_jsonl_caption(root, caption):
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    (root / "captions.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": caption}) + "\n", encoding="utf-8")
    return CustomSource(str(root)), r"captions.jsonl:1: 'caption' must be a string or a list of strings"


NON_STRINGS = [5, None, ["a", "list"], {"raw": "x"}]


@pytest.mark.parametrize(("layout", "caption"), [
    *[(coco_official, c) for c in NON_STRINGS], *[(coco_karpathy, c) for c in NON_STRINGS],
    (custom_jsonl_caption, 5), (custom_jsonl_caption, {"raw": "x"}),  # (null and string lists are valid there)
])
def test_a_non_string_caption_in_json_is_one_line_naming_file_and_entry(tmp_path, layout, caption):
    source, match = layout(tmp_path, caption)
    one_line_error(source, match)


@pytest.mark.parametrize("layout", [coco_official, coco_karpathy])
def test_json_that_is_not_utf8_or_not_json_is_one_line_with_its_line(tmp_path, layout):
    source, _ = layout(tmp_path, "a dog")
    path = next(tmp_path.rglob("*.json"))
    path.write_bytes(b'{"images": [\n\n{"x": "caf\xe9"}]}')
    one_line_error(source, rf"{re.escape(str(path))}:3: not UTF-8")
    path.write_bytes(b'{"images": [\n\n{"x": ]}')
    one_line_error(source, rf"{re.escape(str(path))}:3: not valid JSON")


# -- captions with no words once normalised --------------------------------------------------------
WORDLESS = ["🐶🐾 ❤️", "!!! ...", "— … ©"]  # emoji, punctuation, symbols: an empty target once normalised


@pytest.mark.parametrize("caption", WORDLESS)
@pytest.mark.parametrize("layout", [*LINE_FORMATS, custom_jsonl, custom_sidecar])
def test_a_caption_with_no_words_is_one_line_naming_file_and_line(tmp_path, layout, caption):
    """The check runs after normalisation: the raw text is not empty."""
    body = {custom_jsonl: json.dumps({"image": "a.jpg", "caption": caption}) + "\n",
            custom_sidecar: f"{caption}\n"}.get(layout, f"b.jpg,{caption}\n").encode()
    source, name = layout(tmp_path, body)
    one_line_error(source, rf"{re.escape(str(tmp_path / name))}: .*(no words|a comment with no words)")


def test_flickr30k_skips_and_counts_a_caption_with_no_words_under_bad_rows_skip(tmp_path, caplog):
    flickr30k_results(tmp_path, "b.jpg,🐶🐶\n".encode())
    Image.new("RGB", (8, 8)).save(tmp_path / "flickr30k_images" / "a.jpg")
    [record] = Flickr30kSource(str(tmp_path), bad_rows="skip").records()
    assert record.captions == ("a dog",)
    assert "Skipped 1 broken rows" in caplog.text and "a comment with no words" in caplog.text


@pytest.mark.parametrize("layout", [coco_official, coco_karpathy])
def test_coco_leaves_out_and_counts_captions_with_no_words_and_images_left_with_none(tmp_path, layout, caplog):
    """A public dataset's stray rows cannot be fixed by its user: left out, counted, named."""
    source, _ = layout(tmp_path, "🐶 !!")
    files = next(tmp_path.rglob("*.json"))
    data = json.loads(files.read_text(encoding="utf-8"))
    if layout is coco_official:  # a second image whose only caption is wordless
        data["images"].append({"id": 2, "file_name": "b.jpg"})
        data["annotations"].append({"image_id": 2, "caption": "..."})
        folder = tmp_path / "train2014"
    else:
        data["images"].append({**data["images"][0], "filename": "b.jpg", "cocoid": 2, "sentences": [{"raw": "..."}]})
        folder = tmp_path / "val2014"
    files.write_text(json.dumps(data), encoding="utf-8")
    folder.mkdir(exist_ok=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(folder / name)
    [record] = source.records()
    assert record.captions == ("a dog",)
    assert "Left out 2 COCO captions with no words once normalised" in caplog.text
    assert "1 images left with no caption" in caplog.text


def test_a_shard_sample_s_captions_with_no_words_are_left_out():
    from imcap.data.shards import _captions

    assert _captions("a dog\n🐶🐶\n!!!\n".encode(), {}) == ("a dog",)
    assert _captions(None, {"captions": ["…", "✨"]}) == ()  # then the sample has "no captions" (skip policy)


def test_imcap_data_stats_on_a_custom_csv_with_an_emoji_caption_is_one_error_line(tmp_path):
    """Through the CLI, in a new process, as a user runs it."""
    from tests.helpers.runs import assert_one_line_error, module

    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    (root / "captions.csv").write_text("image,caption\na.jpg,a dog on a beach\na.jpg,🐶🏖️!\n", encoding="utf-8")
    result = module("data", "stats", "data=custom", f"data.root={root}", cwd=tmp_path)
    assert_one_line_error(result, f"{root / 'captions.csv'}:3: caption '🐶🏖️!' has no words once normalised")


def text_io_without_encoding(path: Path) -> list[str]:
    """Calls of open(), Path.read_text() and Path.write_text() in text mode that leave the
    encoding to the locale."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        # the builtin open(); Path.read_text/write_text (not Image.open, imcap's own read_text, ...)
        builtin = isinstance(node.func, ast.Name) and node.func.id == "open"
        method = isinstance(node.func, ast.Attribute) and node.func.attr in ("read_text", "write_text")
        if not (builtin or method) or any(k.arg == "encoding" for k in node.keywords):
            continue
        modes = [ast.unparse(a) for a in node.args[1:2]] + [ast.unparse(k.value) for k in node.keywords if k.arg == "mode"]
        if any("b" in m for m in modes):  # binary
            continue
        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_text_file_imcap_opens_names_its_encoding():
    sources = [*(ROOT / "imcap").rglob("*.py"), *(ROOT / "experiments").rglob("*.py")]
    found = [hit for path in sorted(sources) for hit in text_io_without_encoding(path)]
    assert found == []
