"""W&B without an API key: offline runs, one per multirun job, caption tables, resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from imcap.train import train
from tests.conftest import TINY

pytestmark = pytest.mark.slow


def offline_runs(folder):
    return sorted(folder.rglob("offline-run-*"))


def test_multirun_without_key_leaves_one_offline_run_per_variant(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    overrides = [o for o in TINY if "attention_dim" not in o] + ["++model.attention.attention_dim=32"]
    result = subprocess.run(
        [sys.executable, "-m", "imcap.train", "-m", "logger=wandb", "model/attention=additive,none",
         "trainer.max_epochs=2", *overrides],
        cwd=tmp_path, env={**env, "IMCAP_ROOT": str(tmp_path)}, capture_output=True, text=True, timeout=900,
        stdin=subprocess.DEVNULL,  # never prompts for a key
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = offline_runs(tmp_path / "logs")
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[-1] for r in runs}) == 2
    for run in runs:
        history = next(run.glob("run-*.wandb")).read_bytes()
        assert b"val/BLEU-4" in history and b"test/BLEU-4" in history
        assert history.count(b"val/captions") >= 2  # a caption table logged each validation epoch
        assert list(run.rglob("captions_*.table.json"))
        assert b"multiruns" in history  # grouped by the sweep folder


def test_resumed_run_continues_the_same_wandb_run(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train(make_cfg("logger=wandb", "trainer.max_epochs=1", "test=false", out=out))
    run_id = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["imcap"]["wandb_run_id"]
    assert run_id
    train(make_cfg("logger=wandb", "trainer.max_epochs=2", "test=false", f"ckpt_path={out}/checkpoints/last.ckpt",
                   out=out))
    ids = {r.name.rsplit("-", 1)[-1] for r in offline_runs(out)}
    assert ids == {run_id}
