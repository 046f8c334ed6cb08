"""`@hydra_entry(name)`: how train, eval and caption start. `@hydra.main` on conf/<name>.yaml
with imcap's error policy (imcap.errors): a user error is one `error:` line, exit status 2."""

from __future__ import annotations

import functools
import io
import re
import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from imcap.config import CONF_DIR
from imcap.errors import report_user_errors
from imcap.plugins import load_plugins


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
            return report_user_errors(task_with_plugins)(cfg)

        def task_with_plugins(cfg: DictConfig) -> Any:
            load_plugins(cfg.get("plugins"))  # the user's own components, before anything is built or loaded
            return task(cfg)

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

