"""What the benchmarks (imcap.bench, imcap.bench_gpu, imcap.gpu_check) train: a model config
composed as `imcap.train` composes it, and the optimiser training builds from it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from imcap.config_compose import compose_config


def compose_model(decoder: str, attention: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The model config of `model/decoder=decoder model/attention=attention` (default dims,
    unless `overrides` say otherwise), optimiser included."""
    cfg = compose_config("train", [f"model/decoder={decoder}", f"model/attention={attention}", *overrides],
                         Path(tempfile.gettempdir()))
    return OmegaConf.to_container(cfg.model, resolve=True)


def build_optimizer(arch: dict[str, Any], module: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimiser training builds (model.optimizer, a partial), over `module`'s parameters."""
    return instantiate(arch["optimizer"])(module.parameters())


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    flags = [k for k in ("fused", "foreach") if optimizer.defaults.get(k)]
    return type(optimizer).__name__ + (f"({', '.join(flags)})" if flags else "")
