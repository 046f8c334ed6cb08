"""What a training or evaluation run builds from its config besides data and model (callbacks,
loggers, the trainer), and the flat metrics it reports. W&B: imcap/wandb_setup.py."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger("imcap")


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate each `_target_` entry of a config group such as callbacks or logger."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat {name: float} from Lightning's metric dicts, sorted by name."""
    return {k: float(v) for k, v in sorted(metrics.items())}
