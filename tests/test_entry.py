"""How train, eval and caption start: Hydra's refusals of a command line become one `error:`
line with exit status 2 (Hydra alone prints several lines and exits 1), and a run refused before
it wrote anything leaves no folder it made."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.runs import assert_one_line_error, module


@pytest.mark.slow
def test_unknown_option_names_it(tmp_path):
    result = module("train", "model.decoder.hiden_dim=3", cwd=tmp_path)
    assert_one_line_error(result, "hiden_dim")
    assert result.returncode == 2  # as for every user error (README)
    assert result.stderr.splitlines() == [
        "error: Could not override 'model.decoder.hiden_dim'; To append to your config use "
        "+model.decoder.hiden_dim=3; Key 'hiden_dim' is not in struct; full_key: model.decoder.hiden_dim"]


@pytest.mark.slow
def test_unknown_group_option_lists_the_choices(tmp_path):
    result = module("train", "model/attention=bogus", cwd=tmp_path)
    assert_one_line_error(result, "bogus", "additive, dot")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


def tree(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("before", [
    [],  # a fresh directory
    ["logs"],  # an empty folder the user made stays
    ["logs/train/multiruns/2026-12-01_10-00-00_ab12/0/train.log"],  # a sweep's folders stay as they are
], ids=["fresh", "empty-logs", "sweep"])
def test_a_refused_run_leaves_no_folder_it_made_and_every_folder_that_was_there(tmp_path, before):
    """A typo in a new process: no empty logs/train/runs/ left behind, nothing there before touched."""
    for name in before:
        path = tmp_path / name
        if name.endswith(".log"):
            path.parent.mkdir(parents=True)
            path.write_text("a job's log\n", encoding="utf-8")
        else:
            path.mkdir(parents=True)
    there = tree(tmp_path)
    result = module("train", "data.batch_size=-1", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "data.batch_size=-1")
    assert tree(tmp_path) == there
