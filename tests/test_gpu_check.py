"""The prepared GPU check (`python -m imcap.gpu_check`): without CUDA it refuses in one line
unless asked for a dry run, and the dry run runs every step on the CPU and reports no figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from imcap.bench_gpu import NO_CUDA
from imcap.gpu_check import main, sync_counts
from tests.helpers.paths import ROOT


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_says_to_use_a_gpu_or_dry(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device here" in err and "--dry" in err
    assert not list(tmp_path.iterdir())


def test_sync_counts_run_the_decoders_and_beam_search_uncounted_on_cpu():
    counts = sync_counts("cpu", pairs=[("lstm", "additive"), ("transformer", "multihead")])
    assert counts == {"lstm-additive": -1, "transformer-multihead": -1, "beam5 (check_every=0)": -1}


@pytest.mark.slow
def test_the_dry_run_runs_every_step_on_the_cpu_and_reports_no_figures(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, "-m", "imcap.gpu_check", "--dry", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=2400,
                          env={**os.environ, "IMCAP_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = done.stdout
    for step in ("bench", "syncs", "train", "ddp (2 CPU processes, gloo: fewer than 2 GPUs)"):
        assert any(line.startswith(step) and " ok " in line for line in table.splitlines()), table
    assert "there are no GPU figures" in table and "captions/s" not in table and "images/s" not in table
    assert json.loads((out / "bench.json").read_text())["gpu"] == NO_CUDA
    assert set(json.loads((out / "syncs.json").read_text()).values()) == {-1}
    assert "Run directory" in (out / "ddp.log").read_text()  # the training entry point ran to its end
