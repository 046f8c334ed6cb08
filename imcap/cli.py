"""What every entry point shares: user errors as one line, config-driven object builders."""

from __future__ import annotations

import functools
import io
import logging
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from imcap.errors import ImcapError
from imcap.files import write_text

log = logging.getLogger("imcap")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _user_error(exc: BaseException) -> ImcapError | None:
    """The ImcapError that `exc` is, or that Hydra wrapped while instantiating; None for a bug.

    Only the explicit cause of Hydra's InstantiationException is followed: an exception raised
    while an ImcapError was being handled (its `__context__`) is a bug, not that error.
    """
    seen: BaseException | None = exc
    while isinstance(seen, InstantiationException):
        seen = seen.__cause__
    return seen if isinstance(seen, ImcapError) else None


def report_user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user mistakes (ImcapError) into `error: <one line>` on stderr and exit status 2;
    anything else is a bug: its full traceback, exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            user = _user_error(exc)
            if user is None:  # a bug: the whole traceback (Hydra would print one line for
                # an error inside a constructor it builds), exit status 1
                traceback.print_exc()
                raise SystemExit(1) from None
            print(f"error: {user}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper


class _HeldStderr:
    """sys.stderr that holds what is written until released, then writes through.

    Hydra prints a bad override or a missing config option over several lines and exits 1
    before the task starts; held back, that text becomes one `error:` line with status 2.
    """

    def __init__(self, real: Any):
        self.real, self.held, self.holding = real, io.StringIO(), True

    def write(self, text: str) -> int:
        return (self.held if self.holding else self.real).write(text)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self.real, name)

    def release(self) -> None:
        self.holding = False
        self.real.write(self.held.getvalue())

    def one_line(self) -> str | None:
        """Hydra's message as one line; None if what was held is a traceback (a bug)."""
        text = self.held.getvalue()
        if "Traceback" in text:
            return None
        parts = []
        text = text.split("Config search path:")[0]  # where Hydra looked: not the user's concern
        for paragraph in re.split(r"\n\s*\n", text):
            lines = [ln.strip() for ln in paragraph.splitlines()
                     if ln.strip() and not ln.strip().startswith("object_type=")]
            if not lines or lines[0].startswith("Set the environment variable"):
                continue
            if lines[0].endswith(":"):  # a heading and its list: "Available options in 'x': a, b"
                parts.append(f"{lines[0]} {', '.join(lines[1:])}")
            else:
                parts.append("; ".join(ln.rstrip(".") for ln in lines))
        return "; ".join(parts) or None


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """`@hydra.main` on conf/<config_name>.yaml with imcap's error policy: a user error (an
    ImcapError, an unknown option or config choice) is one `error:` line and exit status 2; a
    bug keeps its traceback (exit status 1)."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        stderr: _HeldStderr | None = None

        @functools.wraps(task)
        def run_task(cfg: DictConfig) -> Any:
            if stderr is not None and stderr.holding:
                stderr.release()  # the config composed: from here on everything shows as it comes
            return report_user_errors(task)(cfg)

        hydra_main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(run_task)

        @functools.wraps(task)
        def main() -> Any:
            nonlocal stderr
            real = sys.stderr
            stderr = _HeldStderr(real)
            sys.stderr = stderr
            try:
                return hydra_main()
            except SystemExit as exc:
                message = stderr.one_line() if stderr.holding and exc.code == 1 else None
                if message is None:
                    raise
                stderr.holding = False  # Hydra refused the command line or a config file: one line
                print(f"error: {message}", file=real, flush=True)
                raise SystemExit(2) from None
            finally:
                sys.stderr = real
                if stderr.holding:
                    stderr.release()

        return main

    return decorate


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


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as plain containers (Hydra's own node left out)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "hydra"}


def save_config(cfg: DictConfig, path: Path) -> None:
    write_text(path, OmegaConf.to_yaml(OmegaConf.create(plain_config(cfg))))


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
