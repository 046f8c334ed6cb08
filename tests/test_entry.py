"""How train, eval and caption start: Hydra's refusals of a command line become one `error:`
line with exit status 2 (Hydra alone prints several lines and exits 1)."""

from __future__ import annotations

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
