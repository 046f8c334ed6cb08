"""Ctrl-C (SIGINT) or SIGTERM in the middle of training: the run saves a resumable
checkpoints/last.ckpt, prints the exact command that resumes it and exits 128 + the signal;
the printed command, run in a new process from another directory, ends with the metrics of
the uninterrupted run. The signals are real, sent to `python -m imcap.train` in its first
epoch, before any validation wrote a checkpoint."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY

RUN = [*TINY, "trainer.max_epochs=2", "data.batch_size=4"]  # 12 batches an epoch
METRICS = ("test/BLEU-4", "test/CIDEr-D", "test/ROUGE-L", "val/CIDEr-D_best")


class WaitForSignal(pl.Callback):
    """Before batch `batch` of `epoch`, writes `marker` and waits (up to a minute) until the run
    has received SIGINT or SIGTERM, so that a test signals it at a known point."""

    def __init__(self, epoch: int, batch: int, marker: str):
        self.epoch, self.batch, self.marker = epoch, batch, marker

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        from imcap.training.callbacks import StopOnSignal

        stop = next(c for c in trainer.callbacks if isinstance(c, StopOnSignal))
        Path(self.marker).write_text("waiting")
        deadline = time.monotonic() + 60
        while stop.signum is None and not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


def start(root: Path, data: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    root.mkdir(parents=True)
    env = {**os.environ, "IMCAP_ROOT": str(root), "IMCAP_DATA_DIR": str(data), "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "imcap.train", *overrides], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_dir(root: Path) -> Path:
    (found,) = (root / "logs" / "train" / "runs").iterdir()
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The data folder of every run here: the tiny shapes set and its features, made once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    """The run directory of RUN uninterrupted, in a new process: the end each resumed run must reach."""
    root = tmp_path_factory.mktemp("straight") / "root"
    process = start(root, data, *RUN)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return run_dir(root)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_epoch_saves_and_the_printed_command_resumes_to_the_same_end(signum, tmp_path, data, straight):
    marker = tmp_path / "waiting"
    interrupted = start(tmp_path / "first", data, *RUN,
                        f"+callbacks.wait={{_target_:{__name__}.WaitForSignal,epoch:0,batch:3,marker:'{marker}'}}")
    while not marker.exists():
        assert interrupted.poll() is None, interrupted.stderr.read()[-3000:]
        time.sleep(0.2)
    interrupted.send_signal(signum)
    _, stderr = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]

    last = run_dir(tmp_path / "first") / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0 and saved["global_step"] == 4  # batches 0-3 of the first epoch
    assert not list(last.parent.glob("*.tmp*"))  # written atomically: nothing half-written beside it
    assert f"saved {last}" in stderr
    (command,) = [line.removeprefix("Resume with: ") for line in stderr.splitlines() if line.startswith("Resume with: ")]
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "imcap.train"] and args[-1] == f"ckpt_path={last}"

    resumed = start(tmp_path / "second", data, *args[3:])
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]

    got = json.loads((run_dir(tmp_path / "second") / "metrics.json").read_text())
    expected = json.loads((straight / "metrics.json").read_text())
    assert {k: got[k] for k in METRICS} == {k: expected[k] for k in METRICS}
    ours = torch.load(run_dir(tmp_path / "second") / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    theirs = torch.load(straight / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_under_slurm_the_requeue_signal_stays_lightnings_and_sigterm_still_saves(tmp_path, data):
    # a fake SLURM job: Lightning's SLURMEnvironment(auto_requeue=True) answers SIGUSR1 (sent
    # before the time limit) by saving hpc_ckpt_1.ckpt and running `scontrol requeue <job id>`
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "imcap", "SLURM_NODELIST": "localhost",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    marker = tmp_path / "waiting"
    root = tmp_path / "job"
    job = start(root, data, *RUN,
                f"+callbacks.wait={{_target_:{__name__}.WaitForSignal,epoch:0,batch:3,marker:'{marker}'}}", env=slurm)
    while not marker.exists():
        assert job.poll() is None, job.stderr.read()[-3000:]
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not (tmp_path / "scontrol.args").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    job.send_signal(signal.SIGTERM)  # what SLURM sends a job it requeues
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert (run_dir(root) / "hpc_ckpt_1.ckpt").is_file()  # Lightning's own requeue checkpoint
    assert torch.load(run_dir(root) / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert "Resume with: python -m imcap.train " in stderr


class WaitForSignalInValidation(pl.Callback):
    """Before the first validation batch of `epoch`, writes `marker` and waits (up to a minute)
    for SIGTERM, which Lightning answers by ending validation at the next batch."""

    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, marker

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or trainer.current_epoch != self.epoch or batch_idx != 0:
            return
        Path(self.marker).write_text("waiting")
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_during_validation_exits_143_and_names_the_newest_checkpoint(tmp_path, data):
    marker = tmp_path / "waiting"
    job = start(tmp_path / "run", data, *RUN, "data.eval_batch_size=4",  # 4 validation batches
                f"+callbacks.wait={{_target_:{__name__}.WaitForSignalInValidation,epoch:1,marker:'{marker}'}}")
    while not marker.exists():
        assert job.poll() is None, job.stderr.read()[-3000:]
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = run_dir(tmp_path / "run") / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0  # epoch 0's, from its validation
    assert f"Terminated by SIGTERM during validation; the newest checkpoint is {last}" in stderr
    (command,) = [line for line in stderr.splitlines() if line.startswith("Resume with: ")]
    assert command.endswith(f" ckpt_path={last}")
