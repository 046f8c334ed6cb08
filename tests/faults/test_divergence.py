"""A diverged run stops with one `error:` line that names the step and what to try, and leaves
no checkpoint of non-finite weights: each run is `python -m imcap.train` in a new process."""

from __future__ import annotations

import sys

import pytest
import pytorch_lightning as pl
import torch

from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY, run

pytestmark = pytest.mark.slow


class NaNGradientAt(pl.Callback):
    """Puts a NaN into one gradient after the backward pass of global step `step` (the loss
    stays finite): only the gradient check can see it."""

    def __init__(self, step: int):
        self.step = step

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


def train(cwd, *overrides: str):
    return run(sys.executable, "-m", "imcap.train", *TINY, *overrides, cwd=cwd, env={"PYTHONPATH": str(ROOT)})


def the_error(result) -> str:
    """The one `error:` line, which is the last thing the run printed."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip("\n").endswith(errors[0]), result.stderr[-3000:]
    return errors[0]


def assert_no_nonfinite_checkpoint(cwd) -> None:
    for path in (cwd / "logs").rglob("*.ckpt"):
        weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()), path


def test_a_huge_learning_rate_stops_with_one_line_naming_the_step(tmp_path):
    error = the_error(train(tmp_path, "model.optimizer.lr=1e30", "trainer.max_epochs=2"))
    assert error.startswith("error: training diverged at step ")
    assert "(epoch 0): the loss is nan" in error or "(epoch 0): the gradient norm is" in error, error
    assert "model.optimizer.lr (now 1e+30)" in error and "trainer.gradient_clip_val" in error
    assert_no_nonfinite_checkpoint(tmp_path)


def test_weights_that_became_infinite_are_never_saved_as_best(tmp_path):
    # one step of 1e50 (beyond float32) makes the weights infinite; validation follows at once
    error = the_error(train(tmp_path, "model.optimizer.lr=1e50", "trainer.limit_train_batches=1"))
    assert error.startswith("error: training diverged at step 1 (epoch 0): the weights are not finite, so ")
    assert not list((tmp_path / "logs").rglob("best.ckpt"))
    assert_no_nonfinite_checkpoint(tmp_path)


def test_a_nan_gradient_with_a_finite_loss_stops_before_the_step(tmp_path):
    error = the_error(train(tmp_path, f"+callbacks.nan._target_={__name__}.NaNGradientAt", "+callbacks.nan.step=1"))
    assert error.startswith("error: training diverged at step 1 (epoch 0): the gradient norm is nan; try a lower ")
    assert_no_nonfinite_checkpoint(tmp_path)
