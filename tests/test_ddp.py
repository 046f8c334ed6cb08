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


def test_srun_started_ranks_join_through_lightnings_slurm_environment(tmp_path):
    """The README's sbatch script without a cluster: two processes started as `srun` starts
    them (one task per device), with the variables srun sets, run `python -m imcap.train
    trainer=gpu trainer.strategy=ddp ...` as the script does (on the CPU). Lightning's SLURMEnvironment must wire them up (no
    launcher of its own): both ranks train in a world of 2, and the run finishes."""
    import socket

    from tests.helpers.paths import ROOT
    from tests.helpers.runs import TINY

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    record, run_dir = tmp_path / "seen", tmp_path / "shared-run"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "imcap-train", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
             "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": port}
    procs = []
    for rank in (0, 1):
        env = {**os.environ, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "IMCAP_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)}
        for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "MASTER_ADDR"):
            env.pop(key, None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "imcap.train", *TINY, "data.source.num_images={train:16,val:8,test:8}",
             # the README script's overrides, on the CPU
             "trainer=gpu", "trainer.strategy=ddp", "trainer.devices=2", "trainer.num_nodes=1", "data.batch_size=4",
             "trainer.accelerator=cpu", "trainer.precision=32-true", "model.compile=false", "test=false",
             f"hydra.run.dir={run_dir}",
             "+callbacks.record._target_=tests.helpers.callbacks.RecordItems", f"+callbacks.record.path={record}"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"rank{rank}.log", "w")))
    for rank, proc in enumerate(procs):
        assert proc.wait(timeout=900) == 0, (tmp_path / f"rank{rank}.log").read_text()[-3000:]
    rows = {r: [json.loads(line) for line in (tmp_path / f"seen.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert all(rows[r] for r in rows)
    assert {(row["world"], row["cluster"]) for r in rows for row in rows[r]} == {(2, "SLURMEnvironment")}
    assert not {i for row in rows[0] for i in row["items"]} & {i for row in rows[1] for i in row["items"]}
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
