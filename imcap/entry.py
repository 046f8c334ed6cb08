"""`@hydra_entry(name)`: how train, eval and caption start. `@hydra.main` on conf/<name>.yaml
with imcap's error policy (imcap.errors): a user error is one `error:` line, exit status 2.

What Hydra refuses before the task starts is one line too; an override its grammar cannot read
(`images=[café.jpg]`: unquoted values are ASCII) names itself and its quoted form. An option the
command leaves `???` names itself and an example (REQUIRED_OPTIONS) once the task reads it; a `???`
read from anywhere else (a checkpoint's config, one built in code) is a bug. A group's `_`-files
(data/_base.yaml) are the bases its options extend: not listed as options, and refused if chosen.

In a multirun (`-m`, `hparams_search=...`) a failing job does not end the sweep: its error is
printed as it happens, the job raises `JobFailed` (an Exception, which Hydra's launchers record
and go past, and the Optuna sweeper tells its study as a FAILED trial), and at the end one
summary names every failed job; the exit status is then 2, or 1 if any job met a bug.

A single run that fails on its input or is stopped with Ctrl-C before it wrote anything leaves
no run directory: Hydra made it before the task started, and one holding only Hydra's files and
the log would look like a run (`remove_unused_run_dir`). Nor does it leave the folders above it
that Hydra made for it (a typo in a fresh directory leaves no empty logs/train/runs/): the Hydra
callback `RecordNewParents` (conf/hydra/default.yaml) notes which did not exist yet. A run that
wrote anything keeps it all, and so does a bug (its composed config in .hydra/ helps a report).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import sys
import tempfile
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from imcap.config_compose import CONF_DIR, register_decoding_overrides
from imcap.console import quiet_libraries
from imcap.errors import ImcapError, end_progress_bars, report_user_errors, user_error
from imcap.overrides import hide_base_files, is_base_file, unreadable_override
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

    def hold(self) -> None:
        """Hold what is written from now on (again)."""
        self.held, self.holding = io.StringIO(), True

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
                parts.append(f"{lines[0]} {', '.join(ln for ln in lines[1:] if not is_base_file(ln))}")
            else:
                parts.append("; ".join(ln.rstrip(".") for ln in lines))
        return "; ".join(parts) or None


# where the jobs of this command's sweep record how they ended (set by `main`, inherited by the
# joblib launcher's worker processes): one JSON line per job
SWEEP_RECORD = "IMCAP_SWEEP_RECORD"


class JobFailed(CompactHydraException):
    """A multirun job that failed; its message names the job and its one-line error. Raised
    instead of SystemExit, which would leave Hydra's launcher and end the whole sweep."""


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_job(error: str | None, bug: bool = False) -> int:
    """Append how this job ended to the sweep's record; returns the job's number."""
    from hydra.core.hydra_config import HydraConfig

    num, overrides = HydraConfig.get().job.num, list(HydraConfig.get().overrides.task)
    path = os.environ.get(SWEEP_RECORD)
    if path:
        with open(path, "a", encoding="utf-8") as f:  # one short line per append: jobs in parallel do not mix
            f.write(json.dumps({"num": num, "overrides": overrides, "error": error, "bug": bug}) + "\n")
    return num


def _sweep_jobs(path: str) -> list[dict]:
    """How each job of this command's sweep ended, in the order they ended ([] if none ran)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


# the folders above this single run's directory that did not exist when it started, deepest first
_new_parents: list[Path] = []


class RecordNewParents(Callback):
    """Hydra callback (conf/hydra/default.yaml): before Hydra makes a single run's directory, with
    its parents, note which of those parents do not exist yet, so that `remove_unused_run_dir`
    removes them too and nothing else. A sweep's folders are never noted (no on_multirun_start)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        _new_parents.clear()
        HydraConfig.instance().set_config(config)  # a run dir naming ${hydra:...}; Hydra sets it next anyway
        try:
            run_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
        except Exception:  # a run dir that does not resolve: Hydra reports it next, before making anything
            return
        _new_parents.extend(folder for folder in run_dir.parents if not folder.exists())


def remove_unused_run_dir() -> None:
    """Remove this run's directory if it holds nothing but what Hydra wrote for it (its
    output_subdir, .hydra/, and the log files of this process); anything else keeps it all.
    The folders Hydra made above it for this run (logs/, logs/train/, ...) go too, each only
    while it is empty: one that holds another run stays, and so does every folder above it."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    if run_dir == Path.cwd().resolve() or run_dir in Path.cwd().resolve().parents:  # hydra.run.dir=.
        return
    logs = {Path(h.baseFilename).resolve() for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)}
    own = run_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None  # None in a DDP child rank
    entries = list(run_dir.rglob("*"))
    files = [p for p in entries if p.is_symlink() or not p.is_dir()]
    if any(p.resolve() not in logs and (own is None or own not in p.parents) for p in files):
        return
    for path in files:
        path.unlink(missing_ok=True)
    try:
        for folder in sorted(set(entries) - set(files), key=lambda p: len(p.parts), reverse=True):
            folder.rmdir()
        run_dir.rmdir()
        made_for_it = Path(hydra_cfg.runtime.output_dir).parents  # as Hydra named it, before resolve()
        for folder in (folder for folder in _new_parents if folder in made_for_it):
            folder.rmdir()
    except OSError:  # another process (a DDP rank, another run) wrote into it meanwhile: what is left stays
        pass


def _run_job(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """One job of a multirun: a user error is printed as one line, a bug with its traceback,
    and either is raised again as JobFailed so that the sweep goes on to its next job."""
    try:
        result = task(cfg)
    except Exception as exc:
        end_progress_bars()
        user = user_error(exc)
        if user is not None:
            message, bug = str(user), False
        else:
            traceback.print_exc()
            message, bug = f"{type(exc).__name__}: {exc}".splitlines()[0], True
        num = _record_job(message, bug)
        print(f"error: job {num}: {message}", file=sys.stderr, flush=True)
        raise JobFailed(f"job {num} failed: {message}") from None
    _record_job(None)
    return result


def _sweep_summary(jobs: list[dict]) -> int | None:
    """Print which jobs of the sweep failed, each named by the overrides that set it apart from
    the other jobs; the sweep's exit status (None: no job failed)."""
    failed = sorted((j for j in jobs if j["error"] is not None), key=lambda j: j["num"])
    if not failed:
        return None
    shared = set.intersection(*(set(j["overrides"]) for j in jobs)) if len(jobs) > 1 else set()
    lines = [f"error: {len(failed)} of {len(jobs)} sweep jobs failed:"]
    for job in failed:
        own = " ".join(o for o in job["overrides"] if o not in shared) or "no overrides of its own"
        lines.append(f"  job {job['num']} ({own}): {job['error']}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 1 if any(j["bug"] for j in failed) else 2


# What to give for each option a conf/ file leaves `???` (required), shown in the one error line of
# a command without it; "<entry>:<option>" where one entry takes more than the others. A test holds
# every `???` under conf/ to an entry here; an option of a plugin's own config gets "give <option>=VALUE".
REQUIRED_OPTIONS = {
    "ckpt_path": "ckpt_path=RUN/checkpoints/best.ckpt",
    "caption:ckpt_path": "ckpt_path=RUN/checkpoints/best.ckpt (or an exported folder, or a Hub repo id)",
    "images": "'images=[photo.jpg,photos/]' (image files or folders)",
    "out": "out=DIR (the folder to write the exported model to)",
    "data.root": "data.root=DIR (the dataset's folder; `make data dataset=NAME root=DIR` downloads a public one)",
}


def missing_options(cfg: DictConfig) -> list[str]:
    """The full keys (data.root) of the values `cfg` leaves `???`, in the config's order; an
    interpolation is not read (`${data.root}` is data.root's concern, not its own)."""
    found: list[str] = []

    def walk(node: DictConfig | ListConfig, prefix: str) -> None:
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            if not prefix and key == "hydra":  # Hydra's own node (in a config composed with it): not an option
                continue
            full = f"{prefix}{key}" if isinstance(node, DictConfig) else f"{prefix.rstrip('.')}[{key}]"
            child = node._get_node(key)
            if OmegaConf.is_missing(node, key):
                found.append(full)
            elif isinstance(child, (DictConfig, ListConfig)) and not OmegaConf.is_interpolation(node, key):
                walk(child, f"{full}.")

    walk(cfg, "")
    return found


def required_option_error(exc: BaseException, missing: list[str], entry: str) -> ImcapError | None:
    """The user's error when `exc` is reading a value that this command's config (conf/<entry>.yaml)
    leaves `???`, one of `missing` (directly or through an interpolation such as data.source.root:
    ${data.root}); it names every option in `missing`. None when the missing value is not one of
    them: a config built in code or read from a checkpoint that leaves a `???` is a bug, and keeps
    its traceback."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    if not isinstance(exc, (MissingMandatoryValue, InterpolationToMissingValueError)):
        return None
    # both say "Missing mandatory value: <key>"; the key is the full one for a read of the option
    # itself and for an absolute interpolation (${data.root}), the only kinds conf/ uses
    read = re.search(r"Missing mandatory value: (\S+)", str(exc))
    if read is None or read.group(1) not in missing:
        return None
    return required_options(missing, entry)


def required_options(missing: list[str], entry: str) -> ImcapError:
    """The one line for options a command left `???`: each named, with its example."""
    gives = [REQUIRED_OPTIONS.get(f"{entry}:{key}") or REQUIRED_OPTIONS.get(key)
             or f"{key}=VALUE (`python -m imcap.{entry} --help` shows the config)" for key in missing]
    verb = "is" if len(missing) == 1 else "are"
    return ImcapError(f"{' and '.join(missing)} {verb} required: give {' and '.join(gives)}")


def refuse_chosen_bases() -> None:
    """A base chosen as a group's option (data=_base) is one error line naming the group's options."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    for group, option in HydraConfig.get().runtime.choices.items():
        if isinstance(option, str) and is_base_file(option) and not group.startswith("hydra/"):
            hydra_ = GlobalHydra.instance()
            if hydra_.is_initialized():
                names = hydra_.config_loader().get_group_options(group)
            else:  # a joblib worker, or a config composed and closed (imcap.data): imcap's own files
                names = [p.stem for p in (CONF_DIR / group).glob("*.yaml") if not is_base_file(p.stem)]
            options = f"one of {', '.join(sorted(names))}" if names else "another (--help lists them)"
            raise ImcapError(f"{group}={option} is the base file that every {group} option extends, not an "
                             f"option: choose {options} ({group}=NAME)")


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """`@hydra.main` on conf/<config_name>.yaml with imcap's error policy: a user error (an
    ImcapError, an unknown option or config choice) is one `error:` line and exit status 2; a
    bug keeps its traceback (exit status 1)."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def run_task(cfg: DictConfig) -> Any:
            # read from sys.stderr, not kept in this closure: a launcher that runs jobs in worker
            # processes (joblib) pickles run_task, and the held stream's real file cannot be
            # pickled; in such a worker nothing is held
            stderr = sys.stderr if isinstance(sys.stderr, _HeldStderr) else None
            if stderr is not None and stderr.holding:
                stderr.release()  # the config composed: from here on everything shows as it comes
            if not _in_multirun():
                try:
                    return report_user_errors(task_with_plugins)(cfg)
                except SystemExit as stop:
                    if stop.code not in (0, None, 1):  # a user error or Ctrl-C, not a bug
                        remove_unused_run_dir()
                    raise
            try:
                return _run_job(task_with_plugins, cfg)
            finally:
                # what a sweeper prints between jobs shows when the next starts; after the last,
                # Hydra's basic sweeper raises a failed job again, which the summary replaces
                if stderr is not None:
                    stderr.hold()

        def task_with_plugins(cfg: DictConfig) -> Any:
            refuse_chosen_bases()
            missing = missing_options(cfg)  # before the task sets any
            quiet_libraries()  # library messages a user cannot act on: imcap.console names each
            load_plugins(cfg.get("plugins"))  # the user's own components, before anything is built or loaded
            try:
                return task(cfg)
            except Exception as exc:
                required = required_option_error(exc, missing, config_name)
                if required is None:
                    raise
                raise required from None

        hydra_main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(run_task)

        @functools.wraps(task)
        def main() -> Any:
            register_decoding_overrides()  # eval.yaml's and caption.yaml's decoding.* (no cost: the entry imported Decoding)
            hide_base_files()
            real = sys.stderr
            stderr = _HeldStderr(real)
            sys.stderr = stderr
            record = os.path.join(tempfile.gettempdir(), f"imcap-sweep-{uuid.uuid4().hex}.jsonl")
            os.environ[SWEEP_RECORD] = record
            try:
                try:
                    result = hydra_main()
                except SystemExit as exc:
                    jobs = _sweep_jobs(record)
                    if jobs:  # a sweep whose jobs ended; the basic sweeper ends one by raising a failed job again
                        if "Traceback" not in stderr.held.getvalue():
                            stderr.hold()  # its re-raise of a job that the summary names: not shown
                        status = _sweep_summary(jobs)
                        raise SystemExit(status if status is not None and exc.code == 1 else exc.code) from None
                    message = None
                    if stderr.holding and exc.code == 1:
                        held = stderr.held.getvalue()
                        if "override_grammar" in held and "Traceback" not in held:  # Hydra's link on a parse error
                            message = unreadable_override(sys.argv[1:])
                        message = message or stderr.one_line()
                    if message is None:
                        raise
                    stderr.holding = False  # Hydra refused the command line or a config file: one line
                    print(f"error: {message}", file=real, flush=True)
                    raise SystemExit(2) from None
                status = _sweep_summary(_sweep_jobs(record))  # a sweeper that goes past failed jobs (Optuna) returns
                if status is not None:
                    raise SystemExit(status)
                return result
            finally:
                sys.stderr = real
                if stderr.holding:
                    stderr.release()
                if os.path.exists(record):
                    os.remove(record)

        return main

    return decorate

