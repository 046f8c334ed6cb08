"""Turn a training checkpoint into a shareable folder: `python -m imcap.export ckpt_path=... out=DIR`.

DIR receives model.safetensors, config.json, vocab.json and a README.md model card (training
data from the checkpoint; test metrics from the run's metrics.json when it is beside
checkpoints/ and they are this checkpoint's: training tests best.ckpt). No pickle:
`Captioner.from_pretrained(DIR)` and `imcap.caption ckpt_path=DIR` read it; upload it with
`hf upload owner/name DIR` to share it by repo id. A checkpoint whose weights hold
NaN or inf (a diverged run) is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from imcap.entry import hydra_entry
from imcap.errors import ImcapError
from imcap.models.captioner import CHECKPOINT_KEY, Captioner, load_checkpoint
from imcap.models.hub import save_pretrained

log = logging.getLogger("imcap.export")
TESTED = "best.ckpt"  # the checkpoint imcap.train tests, whose metrics metrics.json holds


def export(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write the folder for `ckpt_path` into `out`; returns it."""
    ckpt_path = Path(ckpt_path)
    checkpoint = load_checkpoint(ckpt_path)
    captioner = Captioner.from_checkpoint(ckpt_path)
    refuse_non_finite(captioner.state_dict(), ckpt_path)  # what would be shared (not, e.g., metric states)
    metrics, note = own_metrics(ckpt_path, checkpoint)
    folder = save_pretrained(captioner, out, data=checkpoint[CHECKPOINT_KEY].get("data"), metrics=metrics,
                             metrics_note=note)
    log.info("Wrote %s (test metrics: %s)", folder, "from the run's metrics.json" if metrics else note)
    return folder


def refuse_non_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """One line naming the first weight that holds NaN or inf: such a model captions nothing."""
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ImcapError(f"checkpoint {path} holds non-finite weights (NaN or inf in {name}): the run diverged "
                             "before it was saved; export an earlier checkpoint (checkpoints/best.ckpt), or train "
                             "again with a lower model.optimizer.lr")


def own_metrics(ckpt_path: Path, checkpoint: dict[str, Any]) -> tuple[dict[str, float] | None, str]:
    """The run's test metrics if they are `ckpt_path`'s own, else None and why not."""
    metrics_file = ckpt_path.resolve().parent.parent / "metrics.json"  # <run>/checkpoints/x.ckpt
    if not metrics_file.is_file():
        return None, "Not recorded (no metrics.json beside the checkpoint's folder)."
    tested = ckpt_path.resolve().parent / TESTED
    if ckpt_path.name != TESTED and not same_step(checkpoint, tested):
        return None, (f"Not recorded for this checkpoint: the run's test metrics are those of {TESTED}, "
                      f"not of {ckpt_path.name}.")
    return json.loads(metrics_file.read_text(encoding="utf-8")), ""


def same_step(checkpoint: dict[str, Any], other: Path) -> bool:
    """Whether `other` was saved at the same training step as `checkpoint` (last.ckpt of the
    epoch that was also the best): the same weights."""
    if not other.is_file():
        return False
    theirs = torch.load(other, map_location="cpu", weights_only=True)
    return all(checkpoint.get(k) is not None and checkpoint.get(k) == theirs.get(k) for k in ("epoch", "global_step"))


@hydra_entry("export")
def main(cfg: DictConfig) -> None:
    export(cfg.ckpt_path, cfg.out)


if __name__ == "__main__":
    main()
