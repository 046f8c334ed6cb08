"""A shared checkpoint cannot direct code: `imcap.eval` and `imcap.caption`, run as a user runs
them, refuse a checkpoint whose stored config names a function, and nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.checkpoints import write_untrained_checkpoint
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir):
    from imcap.config_compose import compose_config
    from tests.helpers.runs import TINY

    out = tmp_path_factory.mktemp("ckpt")
    return write_untrained_checkpoint(compose_config("train", TINY, out, data_dir), out / "model.ckpt")


def evil(checkpoint: dict, where: str, victim) -> dict:
    """`checkpoint` with a torch.save call that would write `victim`, stored at `where`."""
    import copy

    evil = copy.deepcopy(checkpoint)
    *parents, last = where.split(".")
    node = evil["imcap"]
    for key in parents:
        node = node[key]
    node[last] = {"_target_": "torch.save", "_args_": ["pwned", str(victim)]}
    return evil


@pytest.mark.parametrize("where", ["data.seed", "architecture.decoder.dropout"])
@pytest.mark.parametrize("entry", ["eval", "caption"])
def test_a_checkpoint_naming_code_is_refused_and_writes_nothing(checkpoint, where, entry, tmp_path):
    victim = tmp_path / "victim.txt"
    torch.save(evil(checkpoint, where, victim), tmp_path / "shared.ckpt")
    image = ROOT / "experiments" / "attention_variants" / "example-attention.png"
    args = [f"ckpt_path={tmp_path}/shared.ckpt"] + ([f"images=[{image}]"] if entry == "caption" else [])
    result = subprocess.run([sys.executable, "-m", f"imcap.{entry}", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "IMCAP_ROOT": str(tmp_path)})
    assert not victim.exists()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path}/shared.ckpt is refused: {where}._target_ names 'torch.save' where no "
        "component goes; a stored config may only name imcap's registered components (imcap.registry), "
        "never other code"]
