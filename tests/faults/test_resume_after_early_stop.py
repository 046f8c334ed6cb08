"""A run that EarlyStopping stopped, resumed from its last.ckpt (as after a kill during its final
test), trains no further epoch: it goes straight to testing the best checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY, run

pytestmark = pytest.mark.slow


def train(cwd: Path, *overrides: str):
    cwd.mkdir()
    return run(sys.executable, "-m", "imcap.train", *overrides, cwd=cwd,
               env={"IMCAP_DATA_DIR": str(cwd.parent / "data"), "PYTHONPATH": str(ROOT)})  # for RecordItems


def trained_batches(record: Path) -> list[dict]:
    path = Path(f"{record}.rank0.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_resuming_a_run_that_early_stopping_stopped_trains_no_further_epoch(tmp_path):
    record = tmp_path / "batches"
    # every score reaches the threshold: EarlyStopping stops after epoch 0's validation
    overrides = [*TINY, "trainer.max_epochs=3", "+callbacks.early_stopping.stopping_threshold=-1.0",
                 f"+callbacks.record={{_target_:tests.helpers.callbacks.RecordItems,path:'{record}'}}"]
    stopped = train(tmp_path / "first", *overrides, "test=false")  # as if killed before its test
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert {b["epoch"] for b in trained_batches(record)} == {0}
    trained = trained_batches(record)
    (last,) = (tmp_path / "first").glob("logs/train/runs/*/checkpoints/last.ckpt")

    resumed = train(tmp_path / "second", *overrides, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trained_batches(record) == trained  # no batch trained after the resume
    (before,) = (tmp_path / "first").glob("logs/train/runs/*/metrics.json")
    (after,) = (tmp_path / "second").glob("logs/train/runs/*/metrics.json")
    before, after = json.loads(before.read_text()), json.loads(after.read_text())
    assert "test/CIDEr-D" in after and after["val/CIDEr-D_best"] == before["val/CIDEr-D_best"]
