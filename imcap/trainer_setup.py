"""What a training or evaluation run builds from its config besides data and model (callbacks,
loggers, the trainer), and the flat metrics it reports. W&B: imcap/wandb_setup.py."""

from __future__ import annotations

import logging
import os
import platform
import re
from importlib.util import find_spec
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from pytorch_lightning.accelerators import AcceleratorRegistry, MPSAccelerator
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from imcap.errors import ImcapError

log = logging.getLogger("imcap")


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate each `_target_` entry of a config group such as callbacks or logger."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
    """The Lightning Trainer of `cfg.trainer`. Its options that this machine or Lightning refuses
    are one line each (ImcapError, Lightning's exception chained): an accelerator it lacks, or a value
    Lightning's refusal names (`trainer.precision='fp8'`, `trainer.devices=0`, `trainer.strategy=...`).
    Any other failure keeps its traceback."""
    check_devices(cfg.trainer, trainer_choice())
    try:
        return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    except InstantiationException as e:
        refusal = e.__cause__
        option = refused_option(cfg.trainer, refusal) if isinstance(refusal, OPTION_REFUSALS) else None
        if option is None:
            raise
        value = cfg.trainer[option]
        shown = list(value) if isinstance(value, ListConfig) else value
        raise ImcapError(f"trainer.{option}={shown!r}: {' '.join(str(refusal).split())}") from refusal


# what Lightning raises for a Trainer argument it refuses (a bad value, a device this machine lacks)
OPTION_REFUSALS = (MisconfigurationException, ValueError, TypeError)


def refused_option(trainer: DictConfig, refusal: BaseException) -> str | None:
    """The trainer option (a key of cfg.trainer holding a plain value) that Lightning's refusal names
    first, as in "`devices` selected with `CPUAccelerator` should be an int > 0"; None if it names none."""
    first: tuple[int, str] | None = None
    for key, value in trainer.items():
        if isinstance(value, DictConfig) or (isinstance(value, ListConfig) and any(
                isinstance(v, (DictConfig, ListConfig)) for v in value)):
            continue  # plugins: objects the config builds, not a value the user set
        found = re.search(rf"(?<![A-Za-z_]){re.escape(str(key))}(?![A-Za-z_])", str(refusal), re.IGNORECASE)
        if found and (first is None or found.start() < first[0]):
            first = (found.start(), str(key))
    return first[1] if first else None


def trainer_choice() -> str | None:
    """The conf/trainer option the run was started with (`trainer=gpu`), if Hydra composed it."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("trainer") if HydraConfig.initialized() else None


def check_devices(trainer: DictConfig, choice: str | None) -> None:
    """Refuse an accelerator this machine cannot run, or more CUDA GPUs than it has, in one line naming
    the option, before any data is made. Lightning's own refusals name none ("No supported gpu backend
    found!", "You requested gpu: [0, 1, 2, 3] But your machine only has: [0]", torch_xla's missing
    requirement as a traceback). The names are Lightning's registry's plus auto and gpu; gpu is CUDA's
    or Apple's MPS (left to Lightning); auto takes the CUDA GPUs when torch sees any, else the CPU."""
    accelerator = trainer.get("accelerator", "auto")
    if isinstance(accelerator, DictConfig):
        return  # an Accelerator object the config builds (`_target_`): Lightning checks it
    known = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
    if accelerator not in known:
        raise ImcapError(f"trainer.accelerator={accelerator} is not an accelerator Lightning knows; "
                         f"choose one of {', '.join(known)}")
    if accelerator not in ("gpu", "cuda", "auto"):
        check_available(accelerator)
        return
    if accelerator == "gpu" and MPSAccelerator.is_available():
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator == "auto" and gpus == 0:
        return
    named = "trainer=gpu" if choice == "gpu" and accelerator == "gpu" else f"trainer.accelerator={accelerator}"
    if gpus == 0:
        fix = "drop trainer=gpu" if named == "trainer=gpu" else "use trainer.accelerator=cpu"
        raise ImcapError(f"{named} needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
                         f"{fix} to run on the CPU")
    devices = trainer.get("devices", "auto")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > gpus:
        on_cpu = f", or trainer.accelerator=cpu to run {devices} processes on the CPU" if accelerator == "auto" else ""
        raise ImcapError(f"trainer.devices={devices} with {named}, but torch sees {gpus} CUDA GPU{'s' * (gpus > 1)}; "
                         f"use trainer.devices={gpus} or fewer (-1: every GPU){on_cpu}")


def check_available(name: str) -> None:
    """Refuse a registered accelerator other than CUDA's that this machine cannot run, saying why.
    Its class's is_available() decides, as in Lightning's Trainer; for tpu it imports torch_xla only
    when that is installed."""
    accelerator = AcceleratorRegistry[name]["accelerator"]
    if accelerator.is_available():
        return
    fix = "use trainer.accelerator=cpu to run on the CPU"
    if name == "tpu" and find_spec("torch_xla") is None:
        raise ImcapError(f"trainer.accelerator=tpu needs torch_xla, which is not installed; {fix}, "
                         f"or install torch_xla (pip install torch_xla) on a machine with TPUs")
    if name == "tpu":
        why = "needs a TPU and torch_xla sees none (XLAAccelerator.is_available() is False)"
    elif name == "mps" and os.environ.get("DISABLE_MPS") == "1":
        why = "needs Apple's MPS and DISABLE_MPS=1 turns it off"
    elif name == "mps" and not torch.backends.mps.is_available():
        why = "needs Apple's MPS and torch sees none (torch.backends.mps.is_available() is False)"
    elif name == "mps":  # Lightning runs MPS on Apple silicon only
        why = f"needs Apple silicon and this processor is {platform.processor() or 'unknown'}"
    else:  # a plugin's accelerator
        why = f"cannot run on this machine ({accelerator.__name__}.is_available() is False)"
    raise ImcapError(f"trainer.accelerator={name} {why}; {fix}")


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat {name: float} from Lightning's metric dicts, sorted by name."""
    return {k: float(v) for k, v in sorted(metrics.items())}
