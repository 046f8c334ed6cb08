"""Test-only callbacks and utilities."""

from __future__ import annotations

import pytorch_lightning as pl


class CrashAtEpoch(pl.Callback):
    """Simulates a run killed mid-way: raises when `epoch` starts, after the previous epoch's
    checkpoints were written."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at the start of epoch {self.epoch}")


def write_untrained_checkpoint(cfg, path) -> dict:
    """An imcap checkpoint of the (untrained) model a composed train config describes, written
    the way training writes one; returns it. For tests that need a checkpoint but no training."""
    import torch

    from imcap.data.vocab import SPECIALS, Vocabulary
    from imcap.train import build_module

    module = build_module(cfg, Vocabulary([*SPECIALS, "a", "red", "circle", "square"]))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint


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
