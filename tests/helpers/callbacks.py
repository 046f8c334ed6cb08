"""Test-only callbacks: a crash mid-run, bugs in constructors Hydra builds, a record of the
items each rank trained on (streamed shards)."""

from __future__ import annotations

import json
import time

import pytorch_lightning as pl


class CrashAtEpoch(pl.Callback):
    """Simulates a run killed mid-way: raises when `epoch` starts, after the previous epoch's
    checkpoints were written."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at the start of epoch {self.epoch}")


class BugInConstructor(pl.Callback):
    """A callback whose constructor has a bug: it must surface with its traceback."""

    def __init__(self):
        raise ZeroDivisionError("a bug in a Hydra-built constructor")


class BugWhileHandlingUserError(pl.Callback):
    """A bug raised while an ImcapError is being handled: it is the bug that must surface."""

    def __init__(self):
        from imcap.errors import ImcapError

        try:
            raise ImcapError("a user error that was handled")
        except ImcapError:
            {}["missing"]  # the bug


class PauseAt(pl.Callback):
    """Stops the run in the middle of `epoch` (before batch `batch`) and waits there to be killed:
    writes `marker` so that a test knows when to send SIGKILL."""

    def __init__(self, epoch: int, batch: int, marker: str):
        self.epoch, self.batch, self.marker = epoch, batch, marker

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            import signal
            from pathlib import Path

            Path(self.marker).write_text("paused")
            while True:
                signal.pause()  # until the test's SIGKILL


class RecordItems(pl.Callback):
    """Appends one JSON line per trained batch to `path`.rank<R>.jsonl: epoch, global step
    after the batch, the batch's `item_ids`, its padded width, the world size and the cluster
    environment that set up the ranks. With `stop_at_step`, the
    run writes `path`.stopped and hangs before training that step (its checkpoint of the step
    before is written), so that a test can kill -9 it at a known point mid-epoch."""

    def __init__(self, path: str, stop_at_step: int | None = None):
        self.path, self.stop_at_step = path, stop_at_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.stop_at_step is not None and trainer.global_step == self.stop_at_step:
            open(f"{self.path}.stopped", "w").close()
            time.sleep(3600)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        line = {"epoch": trainer.current_epoch, "step": trainer.global_step, "items": batch["item_ids"],
                "width": batch["tokens"].shape[1], "world": trainer.world_size,
                "cluster": type(getattr(trainer.strategy, "cluster_environment", None)).__name__}
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


class RecordLosses(pl.Callback):
    """Appends each trained batch's loss to `path` (one number per line): fast_dev_run runs
    have no logger to read it from."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        with open(self.path, "a") as f:
            f.write(f"{float(outputs['loss']):.9g}\n")
