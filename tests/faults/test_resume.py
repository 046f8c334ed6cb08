"""A run killed with SIGKILL mid-epoch, resumed from another directory, then killed with
SIGKILL in the middle of writing a checkpoint and resumed from a third directory, ends exactly
where the uninterrupted run does: test metrics, val/CIDEr-D_best, best.ckpt weights and
predictions.

Each run is `python -m imcap.train` as a user types it, in its own working directory and
without hydra.run.dir. The learning rate jumps after epoch 2, so the best epoch (2) comes
before both kills and every later epoch is worse: a resume that lost the best score would let
epoch 3 overwrite best.ckpt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY

pytestmark = pytest.mark.slow

RUN = [*TINY, "trainer.max_epochs=5", "model.optimizer.lr=3e-2",
       "model.scheduler._target_=torch.optim.lr_scheduler.MultiStepLR", "~model.scheduler.T_max",
       "~model.scheduler.eta_min", "+model.scheduler.milestones=[2]", "+model.scheduler.gamma=30"]
TEST_METRICS = ("test/BLEU-4", "test/CIDEr-D", "test/ROUGE-L", "val/CIDEr-D_best")


# a sitecustomize.py that SIGKILLs its process half-way through its Nth checkpoint save
SIGKILL_IN_SAVE = ROOT / "tests" / "helpers" / "sigkill_in_checkpoint_save"


def train(root: Path, data: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    root.mkdir(parents=True)
    env = {**os.environ, "IMCAP_ROOT": str(root), "IMCAP_DATA_DIR": str(data), "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "imcap.train", *RUN, *overrides], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(root / "stderr.txt", "w"))


def finished(process: subprocess.Popen, root: Path) -> Path:
    """The run directory of a run that ended normally."""
    assert process.wait(timeout=900) == 0, (root / "stderr.txt").read_text()[-3000:]
    return run_dir(root)


def run_dir(root: Path) -> Path:
    (found,) = (root / "logs" / "train" / "runs").iterdir()
    return found


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_killed_twice_and_resumed_from_elsewhere_ends_like_the_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    straight = finished(train(tmp_path / "straight", data), tmp_path / "straight")
    assert torch.load(straight / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] <= 2  # before the kills

    # 1. SIGKILL in the middle of epoch 3
    marker = tmp_path / "paused"
    first = train(tmp_path / "first", data, f"+callbacks.pause={{_target_:tests.helpers.callbacks.PauseAt,epoch:3,batch:1,"
                                             f"marker:'{marker}'}}")
    while not marker.exists():
        assert first.poll() is None, (tmp_path / "first" / "stderr.txt").read_text()[-3000:]
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    last = run_dir(tmp_path / "first") / "checkpoints" / "last.ckpt"

    # 2. resumed from another directory; SIGKILL half-way through writing epoch 4's last.ckpt
    #    (its 2nd checkpoint save: epoch 3's last.ckpt is the 1st, no later epoch is a new best)
    tmpdir = tmp_path / "systemtmp"
    tmpdir.mkdir()
    second = train(tmp_path / "second", data, f"ckpt_path={last}",
                   env={"PYTHONPATH": f"{SIGKILL_IN_SAVE}{os.pathsep}{ROOT}", "IMCAP_TEST_SIGKILL_AT_SAVE": "2",
                        "TMPDIR": str(tmpdir)})
    assert second.wait(timeout=900) == -signal.SIGKILL, (tmp_path / "second" / "stderr.txt").read_text()[-3000:]
    second_ckpts = run_dir(tmp_path / "second") / "checkpoints"
    assert torch.load(second_ckpts / "last.ckpt", weights_only=True)["epoch"] == 3  # the old one, whole
    assert not [p for p in tmpdir.rglob("*") if p.is_file()]  # nothing half-written in the system temp directory

    # 3. resumed from a third directory
    third = finished(train(tmp_path / "third", data, f"ckpt_path={second_ckpts / 'last.ckpt'}"),
                     tmp_path / "third")

    expected = json.loads((straight / "metrics.json").read_text())
    got = json.loads((third / "metrics.json").read_text())
    assert {k: got[k] for k in TEST_METRICS} == {k: expected[k] for k in TEST_METRICS}
    assert (third / "predictions" / "test.json").read_text() == (straight / "predictions" / "test.json").read_text()
    ours, theirs = weights(third / "checkpoints" / "best.ckpt"), weights(straight / "checkpoints" / "best.ckpt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
