"""Atomic writes: a process killed while it writes leaves the old file whole; writers never share a
temporary; a full disk is one error line; run directories are unique."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from imcap.atomic_files import run_stamp
from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY, assert_one_line_error, run

# A process whose writes past 64 KiB kill it (SIGXFSZ with its default action: termination
# inside the write call), rewriting a small valid metrics.json with a large one.
KILLED_WRITER = """
import resource, signal, sys
from imcap.atomic_files import write_json
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
write_json(sys.argv[1], {f"val/metric_{i}": i / 7 for i in range(20000)})
"""


def test_a_kill_during_a_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"test/BLEU-4": 0.25}))
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT, timeout=120)
    assert result.returncode == -signal.SIGXFSZ  # killed in the middle of writing
    assert json.loads(path.read_text()) == {"test/BLEU-4": 0.25}


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    from imcap.atomic_files import write_json

    write_json(tmp_path / "out" / "a.json", {"x": "é"})
    write_json(tmp_path / "out" / "a.json", [1, 2])
    assert json.loads((tmp_path / "out" / "a.json").read_text(encoding="utf-8")) == [1, 2]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.json"]


# Writes half of a JSON file, says so (the "ready" file), waits for "go", then writes the rest:
# another process writes the same target in between.
SLOW_WRITER = """
import pathlib, sys, time
from imcap.atomic_files import write_atomic
target, ready, go = map(pathlib.Path, sys.argv[1:4])
def write(f):
    f.write(b'{"writer": "slow", "padding": "')
    f.flush()
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    f.write(b'x' * 100000 + b'"}')
write_atomic(target, write)
"""


def test_two_processes_writing_one_file_never_share_a_temporary(tmp_path):
    target, ready, go = tmp_path / "out" / "metrics.json", tmp_path / "ready", tmp_path / "go"
    slow = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target), str(ready), str(go)], cwd=ROOT)
    try:
        while not ready.exists():
            assert slow.poll() is None, "the slow writer ended before it was half done"
            time.sleep(0.01)
        fast = subprocess.run([sys.executable, "-c", "import sys; from imcap.atomic_files import write_json; "
                               "write_json(sys.argv[1], {'writer': 'fast'})", str(target)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert fast.returncode == 0, fast.stderr
        assert json.loads(target.read_text()) == {"writer": "fast"}
        go.touch()
        assert slow.wait(timeout=120) == 0  # its temporary was its own: nothing moved it away
    finally:
        slow.kill()
    assert json.loads(target.read_text()) == {"writer": "slow", "padding": "x" * 100000}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs mounted at tmp_path/disk (root only; skipped where mounting is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({mounted.stderr.strip() or 'mount failed'})")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_error_naming_the_file_which_keeps_its_content(small_disk):
    from imcap.atomic_files import write_json
    from imcap.errors import ImcapError

    target = small_disk / "metrics.json"
    write_json(target, {"test/BLEU-4": 0.25})
    with pytest.raises(ImcapError, match=r"cannot write .*metrics\.json: No space left on device; free space"):
        write_json(target, {f"val/metric_{i}": i / 7 for i in range(20000)})
    assert json.loads(target.read_text()) == {"test/BLEU-4": 0.25}
    assert [p.name for p in small_disk.iterdir()] == ["metrics.json"]  # no temporary left behind


@pytest.mark.slow
def test_training_onto_a_full_disk_ends_with_one_error_line(small_disk, tmp_path):
    result = run(sys.executable, "-m", "imcap.train", *TINY, f"hydra.run.dir={small_disk}/run", cwd=tmp_path)
    assert_one_line_error(result, f"error: cannot write {small_disk}/run/checkpoints/", "No space left on device",
                          "free space")
    assert not list(small_disk.rglob("*.tmp"))


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_two_run_directories(tmp_path):
    env = {"PYTHONPATH": f"{ROOT / 'tests' / 'helpers' / 'frozen_clock'}:{ROOT}",
           "IMCAP_TEST_FROZEN_CLOCK": "2026-01-02T03:04:05", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "imcap.train", *TINY, "trainer.fast_dev_run=true"]
    started = [subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "IMCAP_ROOT": str(tmp_path), **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in started:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 2, runs
    assert all(r.name.startswith("2026-01-02_03-04-05_") and (r / "metrics.json").is_file() for r in runs)


@pytest.mark.parametrize(("env", "stamp"), [
    ({"SLURM_JOB_ID": "4242"}, "slurm-4242"),
    ({"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "3"}, "slurm-4240_3"),
    ({"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "1"}, "slurm-4242.1"),
])
def test_a_requeued_slurm_job_comes_back_to_its_run_directory(monkeypatch, env, stamp):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run_stamp() == run_stamp() == stamp  # the same name at every (re)start of the job


def test_outside_slurm_two_stamps_differ(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    assert run_stamp() != run_stamp()
