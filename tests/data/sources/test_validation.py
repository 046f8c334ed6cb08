"""What readers share: option checks, the missing-image policy, captions with no words, paths
kept inside the root, and the messages for a dataset that is not there."""

from __future__ import annotations

import logging

import pytest

from imcap.data.records import CaptionRecord
from imcap.data.sources.validation import (
    check_caption,
    check_choice,
    fetch_command,
    inside_root,
    keep_existing,
    missing_root,
)
from imcap.errors import ImcapError


def _record(name: str) -> CaptionRecord:
    return CaptionRecord(name, f"/images/{name}", ("a caption",), "train")


def test_an_unknown_choice_names_the_option_and_the_choices():
    assert check_choice("skip", ("error", "skip"), "data.source.missing_images") == "skip"
    with pytest.raises(ImcapError, match=r"^data.source.missing_images='ignore'; use 'error' or 'skip'$"):
        check_choice("ignore", ("error", "skip"), "data.source.missing_images")


def test_missing_images_stop_the_run_or_are_skipped_and_counted(caplog):
    pairs = [(_record("a.jpg"), True), (_record("b.jpg"), False), (_record("c.jpg"), False)]
    with pytest.raises(ImcapError, match=r"^2 demo images named in list.txt are missing \(first: /images/b.jpg\)"):
        keep_existing(pairs, "error", "demo", "list.txt")
    with caplog.at_level(logging.WARNING):
        kept = keep_existing(pairs, "skip", "demo", None)
    assert [r.image_id for r in kept] == ["a.jpg"]
    assert "Skipped 2 of 3 demo images that are missing (first: /images/b.jpg)" in caplog.text


def test_a_name_leaving_the_root_is_refused(tmp_path):
    assert inside_root(tmp_path, "sub/a.jpg", "list.txt:3") == (tmp_path / "sub" / "a.jpg").resolve()
    for name in ("../a.jpg", "/etc/passwd"):
        with pytest.raises(ImcapError, match=r"^list.txt:3: image .* outside data.root="):
            inside_root(tmp_path, name, "list.txt:3")


def test_a_missing_root_names_the_command_that_fetches_it(tmp_path):
    command = fetch_command("coco", tmp_path / "coco", "data.source.year=2017")
    assert command == f'make data dataset=coco root={tmp_path}/coco ARGS="data.source.year=2017"'
    message = str(missing_root(tmp_path / "coco", "MS COCO", command))
    assert message.startswith(f"data.root={tmp_path}/coco does not exist: fetch MS COCO there with `{command}`")
    assert "\n" not in message


def test_check_caption_runs_after_normalisation():
    assert check_caption("एक बिल्ली", "a.csv:2") == "एक बिल्ली"
    for caption, what in [("", "is empty"), ("  ", "is empty"), ("🐈‍⬛ ✨", "has no words once normalised"),
                          ("?!…", "has no words once normalised")]:
        with pytest.raises(ImcapError, match=rf"^a.csv:2: caption .*{what}.*; write the caption in words"):
            check_caption(caption, "a.csv:2")


def test_keep_existing_leaves_out_wordless_captions_and_images_left_with_none(caplog):
    pairs = [(CaptionRecord(1, "/d/a.jpg", ("a cat", "😺"), "train"), True),
             (CaptionRecord(2, "/d/b.jpg", ("...",), "train"), True),
             (CaptionRecord(3, "/d/c.jpg", ("a dog",), "train"), True)]
    with caplog.at_level(logging.WARNING):
        kept = keep_existing(pairs, "error", "COCO", "captions.json")
    assert [(r.image_id, r.captions) for r in kept] == [(1, ("a cat",)), (3, ("a dog",))]
    assert "Left out 2 COCO captions named in captions.json with no words once normalised (first: '😺' of /d/a.jpg)" \
        in caplog.text and "1 images left with no caption" in caplog.text
