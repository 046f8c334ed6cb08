"""How checkpoints are written and carried across a resume.

- `AtomicCheckpointIO`: every checkpoint is written to a temporary file beside its target and moved
  over it (imcap.atomic_files.write_atomic). Lightning's own writer stages the file in the system temp
  directory and, when that is another filesystem, copies it over the target: a kill during the
  copy leaves a truncated `last.ckpt`, and any kill leaves a checkpoint-sized file in /tmp.
- `RunCheckpoint`: a ModelCheckpoint that keeps the best checkpoint when a run resumes into a
  new run directory (`python -m imcap.train ckpt_path=.../last.ckpt` from anywhere). Lightning
  drops the best score when the directory changes, so the first epoch after the resume would
  overwrite best.ckpt whatever its score; here the best checkpoint so far is copied into the
  new directory and its score carried across. A checkpoint of non-finite weights is refused
  (one `error:` line): it would be kept as best.ckpt when a run diverges in its first epoch.
- `ResumableLoader`: the training DataLoader, resumable in the middle of an epoch. Lightning
  restores its loop's position from a mid-epoch checkpoint (an interrupted run's last.ckpt) but
  starts a plain DataLoader's epoch from its first batch again: the resumed epoch would repeat
  the batches already trained and never reach the last ones.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from imcap.atomic_files import write_atomic
from imcap.errors import ImcapError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Torch checkpoints written atomically: a reader sees the old file or the new one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        write_atomic(path, lambda f: torch.save(checkpoint, f))


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose best checkpoint and score survive a resume into another directory."""

    def _generate_state_key(self, **kwargs: Any) -> str:
        # the key ModelCheckpoint uses: checkpoints written with either class resume with either
        return f"ModelCheckpoint{kwargs!r}"

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        params = [p.detach() for p in trainer.lightning_module.parameters()]
        largest = torch._foreach_norm(params, float("inf")) if params else []  # inf or NaN if any weight is
        if largest and not bool(torch.isfinite(torch.stack([n.float().cpu() for n in largest])).all()):
            from imcap.training.module import diverged

            raise ImcapError(diverged(trainer, f"the weights are not finite, so {Path(filepath).name} is not written"))
        super()._save_checkpoint(trainer, filepath)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir = state_dict.get("dirpath")
        if self.dirpath is None or not old_dir or Path(old_dir) == Path(self.dirpath) or self.monitor is None:
            return super().load_state_dict(state_dict)
        best = state_dict.get("best_model_path") or ""
        if not best or not Path(best).is_file():
            log.warning("The best checkpoint of the resumed run (%s) is gone: best.ckpt holds the best "
                        "epoch from the resume on", best or "none saved")
            return super().load_state_dict(state_dict)

        def moved(path: str | None) -> str:
            return str(Path(self.dirpath) / Path(path).name) if path else ""

        kept = {p: score for p, score in (state_dict.get("best_k_models") or {}).items() if Path(p).is_file()}
        for path in {best, *kept}:
            with open(path, "rb") as source:
                write_atomic(moved(path), lambda f, source=source: shutil.copyfileobj(source, f))
        log.info("Resuming into %s: the best checkpoint so far (%s, %s = %s) is carried across",
                 self.dirpath, best, self.monitor, state_dict.get("best_model_score"))
        super().load_state_dict({
            **state_dict,
            "dirpath": self.dirpath,
            "best_model_path": moved(best),
            "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
            "best_k_models": {moved(p): score for p, score in kept.items()},
            "last_model_path": "",  # the last checkpoint of this directory is written anew
        })


class ResumableLoader(DataLoader):
    """A DataLoader with Lightning's `state_dict`/`load_state_dict` protocol: the state holds
    `batches_trained`, the batches of the current epoch already trained, which whoever writes
    a mid-epoch checkpoint sets first (`StopOnSignal`); it is 0 in every other checkpoint. After
    `load_state_dict` the next epoch's iterator draws the same batches in the same order and
    leaves out that many, without loading them."""

    batches_trained = 0  # stored by the next checkpoint
    skip_batches = 0  # left out by the next iterator

    def state_dict(self) -> dict[str, int]:
        return {"batches_trained": self.batches_trained}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skip_batches = int(state_dict.get("batches_trained", 0))

    @property
    def _index_sampler(self) -> Any:
        sampler = super()._index_sampler
        return _SkipFirst(self, sampler) if self.skip_batches else sampler


class _SkipFirst:
    """The loader's batches of indices without the first `loader.skip_batches`: the skip is
    used up by the first iterator that yields (a worker-backed DataLoader iterator makes one and
    drops it before making the one it reads); the length stays the epoch's, as Lightning counts it."""

    def __init__(self, loader: ResumableLoader, batches: Sized):
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        skip, self.loader.skip_batches = self.loader.skip_batches, 0
        yield from itertools.islice(self.batches, skip, None)
