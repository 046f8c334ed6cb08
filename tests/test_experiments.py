"""Every experiment config (conf/experiment/) trains: composed by the CLI in a new process,
on the tiny shapes data instead of its own dataset, for one fast_dev_run batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.helpers.paths import CONF
from tests.helpers.runs import TINY

pytestmark = pytest.mark.slow

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# The experiment's model at its own size; its data swapped for the tiny shapes demo. Without
# network the named ImageNet weights of VGG/ResNet are not there: random weights, same graph.
SMALL = [*(o for o in TINY if not o.lstrip("+").startswith(("model.decoder", "model.attention", "model.embedding"))),
         "data=shapes", "data.image_size=64", "model.encoder.weights=null", "debug=fast_dev_run"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_trains_a_fast_dev_run_from_the_command_line(experiment, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    recipe = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    scst = OmegaConf.select(recipe, "model.scst.start_epoch") is not None
    result = subprocess.run(
        [sys.executable, "-m", "imcap.train", f"experiment={experiment}", *SMALL, f"paths.data_dir={data_dir}",
         f"hydra.run.dir={run_dir}", *(["model.scst.start_epoch=0"] if scst else [])],  # its SCST phase, now
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "IMCAP_ROOT": str(tmp_path), "OMP_NUM_THREADS": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = OmegaConf.load(run_dir / "config.yaml")
    # the experiment's model is the one that ran (its decoder and sizes, not the defaults)
    for key in ("decoder", "embedding"):
        for name, value in (recipe.get("model", {}).get(key) or {}).items():
            assert config.model[key][name] == value, f"model.{key}.{name}"
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert math.isfinite(metrics["train/loss"]) and 0 <= metrics["val/BLEU-4"] <= 1  # trained, then decoded
    assert ("train/scst_reward" in metrics) == scst
