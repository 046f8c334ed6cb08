"""The command line's overrides: the quoted form of one Hydra cannot read (imcap.overrides)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("override", "quoted", "value"), [
    ("images=[фото.jpg,my photo.jpg]", "images=[\"фото.jpg\",\"my photo.jpg\"]", ["фото.jpg", "my photo.jpg"]),
    ("ckpt_path=runs/été/best.ckpt", "ckpt_path=\"runs/été/best.ckpt\"", "runs/été/best.ckpt"),
    ("out=a#b", "out=\"a#b\"", "a#b"),
])
def test_the_quoted_form_an_unreadable_override_is_given_reads_as_meant(override, quoted, value):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from imcap.overrides import unreadable_override

    line = unreadable_override(["-m", "data=shapes", override])
    assert line is not None and line.startswith(f"cannot read the override {override}: ")
    assert line.endswith(f"quote it: '{quoted}'")
    [as_typed] = shlex.split(line.rsplit("quote it: ", 1)[1])  # what the shell passes on
    [parsed] = OverridesParser.create().parse_overrides([as_typed])
    assert parsed.value() == value
    assert unreadable_override(["data=shapes", 'images=["a.jpg"]']) is None


def test_an_unreadable_home_path_is_quoted_with_the_home_folder_written_out(monkeypatch, tmp_path):
    """Inside quotes the shell leaves `~` as it is, and imcap reads a path as given."""
    from imcap.overrides import unreadable_override

    monkeypatch.setenv("HOME", str(tmp_path))
    line = unreadable_override(["data.root=~/données"])
    assert line is not None and line.endswith(f"quote it: 'data.root=\"{tmp_path}/données\"'")


def test_an_unreadable_option_name_is_not_told_to_quote_its_value():
    from imcap.overrides import unreadable_override

    assert unreadable_override(["model.decoder.hidden dim=3"]) == (
        "cannot read the override model.decoder.hidden dim=3: an option's name holds ASCII letters, digits, _ - and dots")
