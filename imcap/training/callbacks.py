"""Callbacks that the default training config adds."""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch


class ReseedEveryEpoch(pl.Callback):
    """Seed every RNG from (seed, epoch, rank) at the start of each training epoch.

    Dropout and any other randomness then depend only on the epoch, not on what ran before,
    so a run resumed from `last.ckpt` continues exactly as the uninterrupted run would have.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed = (self.seed * 1_000_003 + trainer.current_epoch * 1009 + trainer.global_rank) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
