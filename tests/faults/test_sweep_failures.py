"""A failing job does not end a Hydra sweep: the next jobs run to the end, the failure is named
in one summary at the end, and the exit status says that something failed. Each sweep is
`python -m imcap.train -m ...` in a new process, as a user starts it."""

from __future__ import annotations

import sqlite3
import sys

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY, run

pytestmark = pytest.mark.slow

BAD = "model.feature_dropout=1.5"  # refused with one line when the module is built
SHORT = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]


def sweep(cwd, *overrides: str):
    return run(sys.executable, "-m", "imcap.train", "-m", *TINY, *overrides, cwd=cwd, env={"PYTHONPATH": str(ROOT)})


def summary(stderr: str) -> list[str]:
    """The summary block at the end of stderr: its heading and one line per failed job."""
    lines = stderr.rstrip("\n").splitlines()
    start = max(i for i, line in enumerate(lines) if " sweep jobs failed:" in line)
    return lines[start:]


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_failed_first_job_is_named_and_the_second_runs_to_the_end(launcher, tmp_path):
    # joblib runs its 2 jobs in 2 worker processes, which it sends the task to pickled
    result = sweep(tmp_path, "model.feature_dropout=1.5,0.0", f"hydra/launcher={launcher}",
                   *(["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []))
    assert result.returncode == 2, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert (sweep_dir / "1" / "metrics.json").is_file()  # the second job ran to the end
    assert not (sweep_dir / "0" / "metrics.json").exists()
    assert "error: job 0: model.feature_dropout=1.5; use a probability in [0, 1)" in result.stderr
    assert summary(result.stderr) == [
        "error: 1 of 2 sweep jobs failed:",
        "  job 0 (model.feature_dropout=1.5): model.feature_dropout=1.5; use a probability in [0, 1)"]
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr


def test_a_bug_in_a_job_keeps_its_traceback_and_exits_1(tmp_path):
    result = sweep(tmp_path, *SHORT,
                   "+callbacks.bug._target_=tests.helpers.callbacks.BugInConstructor,pytorch_lightning.Callback")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" in result.stderr and "ZeroDivisionError: a bug in a Hydra-built" in result.stderr
    (heading, failed) = summary(result.stderr)
    assert heading == "error: 1 of 2 sweep jobs failed:"
    assert failed.startswith("  job 0 (+callbacks.bug._target_=tests.helpers.callbacks.BugInConstructor): ")


def test_a_failed_optuna_trial_is_marked_failed_and_the_search_goes_on(tmp_path):
    # a sweep value on the command line joins the search space of conf/hparams_search/optuna.yaml
    result = sweep(tmp_path, *SHORT, "hparams_search=optuna", "hydra.sweeper.n_trials=4",
                   "model.feature_dropout=choice(0.0,1.5)")
    (database,) = (tmp_path / "logs").glob("**/optuna.db")
    with sqlite3.connect(database) as db:
        trials = db.execute("SELECT t.number, t.state, p.param_value FROM trials t JOIN trial_params p "
                            "ON p.trial_id = t.trial_id WHERE p.param_name = 'model.feature_dropout'").fetchall()
    # the sampler's seed draws both values within 4 trials (choice indices: 0 -> 0.0, 1 -> 1.5)
    states = {number: (state, value) for number, state, value in trials}
    assert len(states) == 4 and {s for s, _ in states.values()} == {"COMPLETE", "FAIL"}, trials
    assert all(state == ("FAIL" if value == 1 else "COMPLETE") for state, value in states.values()), trials
    failed = sorted(n for n, (state, _) in states.items() if state == "FAIL")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = summary(result.stderr)
    assert lines[0] == f"error: {len(failed)} of 4 sweep jobs failed:"
    assert [line.split(" (")[0] for line in lines[1:]] == [f"  job {n}" for n in failed]
    assert all(line.endswith("model.feature_dropout=1.5; use a probability in [0, 1)") for line in lines[1:])
