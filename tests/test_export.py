"""`python -m imcap.export` makes a folder that `imcap.caption` reads like the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imcap.models.captioner import Captioner
from tests.helpers.checkpoints import write_untrained_checkpoint
from tests.helpers.paths import ROOT

pytestmark = pytest.mark.slow


def module(name: str, *overrides: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMCAP_ROOT": str(cwd), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"imcap.{name}", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_export_then_caption_from_the_folder_gives_the_checkpoints_captions(make_cfg, tmp_path):
    run = tmp_path / "run"
    write_untrained_checkpoint(make_cfg(out=run), (run / "checkpoints").mkdir(parents=True) or run / "checkpoints" / "best.ckpt")
    (run / "metrics.json").write_text(json.dumps({"test/CIDEr-D": 0.5, "val/CIDEr-D_best": 0.6}))
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")

    exported = module("export", f"ckpt_path={run}/checkpoints/best.ckpt", f"out={tmp_path}/shared", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    card = (tmp_path / "shared" / "README.md").read_text()
    assert "| test/CIDEr-D | 0.5000 |" in card and "Dataset: shapes" in card

    captioned = module("caption", f"ckpt_path={tmp_path}/shared", f"images=[{tmp_path}/0.png,{tmp_path}/1.png]",
                       cwd=tmp_path)
    assert captioned.returncode == 0, captioned.stderr[-3000:]
    expected = Captioner.from_checkpoint(run / "checkpoints" / "best.ckpt").caption([tmp_path / "0.png", tmp_path / "1.png"])
    assert captioned.stdout.splitlines() == [f"{tmp_path}/{i}.png\t{c.text}" for i, c in enumerate(expected)]


def test_exporting_last_ckpt_does_not_carry_best_ckpts_test_metrics_nor_the_data_path(make_cfg, tmp_path):
    """training tests best.ckpt; metrics.json holds its scores, not those of last.ckpt"""
    import torch

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = write_untrained_checkpoint(make_cfg(out=run), run / "checkpoints" / "best.ckpt")
    torch.save({**checkpoint, "epoch": 0, "global_step": 3}, run / "checkpoints" / "best.ckpt")
    torch.save({**checkpoint, "epoch": 4, "global_step": 15}, run / "checkpoints" / "last.ckpt")
    (run / "metrics.json").write_text(json.dumps({"test/CIDEr-D": 0.5, "val/CIDEr-D_best": 0.6}))

    last = module("export", f"ckpt_path={run}/checkpoints/last.ckpt", f"out={tmp_path}/last", cwd=tmp_path)
    assert last.returncode == 0, last.stderr[-3000:]
    card = (tmp_path / "last" / "README.md").read_text()
    assert "0.5000" not in card
    assert "Not recorded for this checkpoint: the run's test metrics are those of best.ckpt, not of last.ckpt." in card
    data_root = checkpoint["imcap"]["data"]["source"]["root"]
    assert "Dataset: shapes" in card and data_root not in card  # no local path: it names its user

    torch.save({**checkpoint, "epoch": 0, "global_step": 3}, run / "checkpoints" / "last.ckpt")  # last is best
    same = module("export", f"ckpt_path={run}/checkpoints/last.ckpt", f"out={tmp_path}/same", cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-3000:]
    assert "| test/CIDEr-D | 0.5000 |" in (tmp_path / "same" / "README.md").read_text()


def test_a_checkpoint_with_nan_weights_is_refused_in_one_line(make_cfg, tmp_path):
    import torch

    checkpoint = write_untrained_checkpoint(make_cfg(out=tmp_path / "run"), tmp_path / "diverged.ckpt")
    name = next(k for k in checkpoint["state_dict"] if k.startswith("captioner.decoder."))
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
    torch.save(checkpoint, tmp_path / "diverged.ckpt")
    result = module("export", f"ckpt_path={tmp_path}/diverged.ckpt", f"out={tmp_path}/shared", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path}/diverged.ckpt holds non-finite weights (NaN or inf in "
        f"{name.removeprefix('captioner.')}): the run "
        "diverged before it was saved; export an earlier checkpoint (checkpoints/best.ckpt), or train again with "
        "a lower model.optimizer.lr"]
    assert not (tmp_path / "shared").exists()
