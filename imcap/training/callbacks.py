"""Callbacks that the default training config adds."""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch


class ReseedEveryStep(pl.Callback):
    """Seed every RNG from (seed, global step, rank) before each training batch.

    Dropout and any other randomness then depend only on the step, not on what ran before it
    (validation, data-loader set-up, a restart), so a run resumed from `last.ckpt` continues
    exactly as the uninterrupted run would have. Costs one `manual_seed` per batch.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        seed = (self.seed * 1_000_003 + trainer.global_step * 1009 + trainer.global_rank) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
