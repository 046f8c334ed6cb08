"""What every entry point shares: user errors as one line, config-driven object builders."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from imcap.errors import ImcapError

log = logging.getLogger("imcap")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _user_error(exc: BaseException) -> ImcapError | None:
    """The ImcapError behind `exc` (Hydra wraps errors raised while instantiating)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, ImcapError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, InstantiationException):  # e.g. a wrong argument name in a config
        lines = str(exc).strip().splitlines()
        where = next((ln.strip() for ln in lines if ln.strip().startswith("full_key:")), "")
        cause = exc.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause else " ".join(lines[1:2])
        return ImcapError(f"{lines[0].rstrip(':')} ({where}): {reason}")
    return None


def report_user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user mistakes into `error: <one line>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            user = _user_error(exc)
            if user is None:
                raise
            print(f"error: {user}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate each `_target_` entry of a config group such as callbacks or logger."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def configure_wandb_mode(cfg: DictConfig) -> None:
    """W&B never prompts: without an API key it runs offline into the run directory."""
    uses_wandb = any("Wandb" in str(c.get("_target_", "")) for c in (cfg.get("logger") or {}).values())
    if uses_wandb and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        log.info("WANDB_API_KEY is not set: W&B runs offline (sync later with `wandb sync`)")


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat {name: float} from Lightning's metric dicts, sorted by name."""
    return {k: float(v) for k, v in sorted(metrics.items())}


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as plain containers (Hydra's own node left out)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "hydra"}


def save_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(plain_config(cfg)), path)


def decoding_with_overrides(stored: dict[str, Any] | None, overrides: DictConfig | None) -> dict[str, Any]:
    """The checkpoint's decoding settings with every non-null override applied."""
    merged = dict(stored or {})
    if overrides:
        merged.update({k: v for k, v in OmegaConf.to_container(overrides).items() if v is not None})
    return merged


def compose_config(name: str, overrides: list[str], output_dir: Path, data_dir: Path | None = None) -> DictConfig:
    """Compose conf/<name>.yaml outside a Hydra app (tests, benchmarks, notebooks), with the
    run directory (and optionally the data directory) pointing where the caller says."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(output_dir)
        cfg.paths.log_dir = str(Path(output_dir) / "logs")
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
    HydraConfig().set_config(cfg)
    return cfg
