"""An Optuna search stores its trials in sqlite, so an interrupted search resumes."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest

from tests.helpers.runs import TINY

pytestmark = pytest.mark.slow


def search(tmp_path, trials: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imcap.train", "-m", "hparams_search=optuna", f"hydra.sweeper.n_trials={trials}",
         "hydra.sweeper.sampler.n_startup_trials=1", *TINY],
        cwd=tmp_path, env={**os.environ, "IMCAP_ROOT": str(tmp_path)}, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"stderr-{trials}.log", "w"), timeout=600,
    )
    assert result.returncode == 0, (tmp_path / f"stderr-{trials}.log").read_text()[-3000:]


def test_rerunning_the_search_continues_the_same_study(tmp_path):
    search(tmp_path, 2)
    storage = f"sqlite:///{tmp_path}/logs/optuna.db"
    study = optuna.load_study(study_name="imcap-train", storage=storage)
    assert len(study.trials) == 2 and all(t.value is not None for t in study.trials)
    search(tmp_path, 1)  # e.g. after an interruption: the stored trials are kept and built on
    assert len(optuna.load_study(study_name="imcap-train", storage=storage).trials) == 3
