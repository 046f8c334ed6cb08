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
