"""Turn a training checkpoint into a shareable folder: `python -m imcap.export ckpt_path=... out=DIR`.

DIR receives model.safetensors, config.json, vocab.json and a README.md model card (training
data from the checkpoint, test metrics from the run's metrics.json when it is beside
checkpoints/). No pickle: `Captioner.from_pretrained(DIR)` and `imcap.caption ckpt_path=DIR`
read it; upload it with `huggingface-cli upload owner/name DIR` to share it by repo id.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from imcap.entry import hydra_entry
from imcap.models.captioner import CHECKPOINT_KEY, Captioner, load_checkpoint

log = logging.getLogger("imcap.export")


def export(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write the folder for `ckpt_path` into `out`; returns it."""
    ckpt_path = Path(ckpt_path)
    meta = load_checkpoint(ckpt_path)[CHECKPOINT_KEY]
    captioner = Captioner.from_checkpoint(ckpt_path)
    metrics_file = ckpt_path.resolve().parent.parent / "metrics.json"  # <run>/checkpoints/x.ckpt
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else None
    folder = captioner.save_pretrained(out, data=meta.get("data"), metrics=metrics)
    log.info("Wrote %s (test metrics %s)", folder, "from " + str(metrics_file) if metrics else "not recorded")
    return folder


@hydra_entry("export")
def main(cfg: DictConfig) -> None:
    export(cfg.ckpt_path, cfg.out)


if __name__ == "__main__":
    main()
