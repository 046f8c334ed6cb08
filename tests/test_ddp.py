"""Two-process DDP on CPU (gloo): the same checkpoint gives the same test metrics and predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from imcap.train import train

pytestmark = pytest.mark.slow


def evaluate(ckpt, out, cwd, *extra):
    result = subprocess.run(
        [sys.executable, "-m", "imcap.eval", f"ckpt_path={ckpt}", f"hydra.run.dir={out}", "trainer.enable_progress_bar=false",
         "metrics=[BLEU,ROUGE-L,CIDEr-D]", *extra],
        cwd=cwd, env={**os.environ, "IMCAP_ROOT": str(cwd)}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "predictions" / "test.json").read_text())


def test_two_process_eval_equals_one_process(make_cfg, tmp_path):
    # 18 test images: with 2 ranks and batch 4 the distributed sampler pads with a repeated image
    run = tmp_path / "run"
    train(make_cfg("data.source.num_images={train:48,val:16,test:17}", "data.eval_batch_size=4", out=run))
    ckpt = run / "checkpoints" / "best.ckpt"
    single, single_preds = evaluate(ckpt, tmp_path / "one", tmp_path)
    double, double_preds = evaluate(ckpt, tmp_path / "two", tmp_path, "trainer=ddp", "trainer.accelerator=cpu",
                                    "trainer.devices=2")
    assert single.keys() == double.keys() and "test/CIDEr-D" in single
    for key in single:
        assert double[key] == pytest.approx(single[key], abs=1e-6), key
    assert double_preds == single_preds and len(single_preds) == 17


def test_ddp_inside_a_multirun_runs_each_job_once(tmp_path):
    overrides = ["data.source.num_images={train:48,val:16,test:16}", "data.source.image_size=64",
                 "callbacks.progress_bar=null", "trainer.enable_progress_bar=false"]
    result = subprocess.run(
        [sys.executable, "-m", "imcap.train", "-m", "model/attention=additive,none", "trainer=ddp",
         "trainer.accelerator=cpu", "trainer.devices=2", "model.test_metrics=[BLEU]", *overrides],
        cwd=tmp_path, env={**os.environ, "IMCAP_ROOT": str(tmp_path)}, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "stderr.log", "w"), timeout=600,
    )
    assert result.returncode == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1  # children did not start sweeps of their own
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert "test/BLEU-4" in json.loads((sweeps[0] / job / "metrics.json").read_text())
    assert not (tmp_path / "logs" / "train" / "runs").exists()  # no stray single runs either
