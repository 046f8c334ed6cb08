"""A corrupt image met by one rank of a 2-process DDP run (gloo on CPU): every rank exits, long
before the process group's 30-minute timeout, and the user reads one line naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

WORDS = ["red", "blue", "green", "circle", "square", "big", "small"]
BOUND = 240  # seconds; the process group would wait 1,800


def custom_data(root: Path, corrupt: str) -> Path:
    """Images with .txt sidecars in train/, val/ and test/ folders; `corrupt` is not an image."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4), ("test", 2)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            path = root / split / f"{i:02d}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
            path.with_suffix(".txt").write_text(f"a {WORDS[i % 7]} {WORDS[(i + 3) % 7]} thing\n", encoding="utf-8")
    (root / corrupt).write_bytes(b"\xff\xd8\xff not really a JPEG")
    return root / corrupt


def ranks_alive(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (the run folder every rank is started with)."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                alive.append(int(proc.name))
        except OSError:
            continue
    return alive


# the validation sampler gives index i to rank i % 2: val/03 goes to rank 1 (a child process
# of the launching rank 0), val/02 to rank 0
@pytest.mark.parametrize("corrupt", ["val/03.png", "val/02.png"])
def test_a_corrupt_image_on_one_rank_ends_every_rank_with_one_line(tmp_path, corrupt):
    bad = custom_data(tmp_path / "data" / "custom", corrupt)
    run = tmp_path / "run"
    args = ["data=custom", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.image_size=32",
            "data.batch_size=4", "data.eval_batch_size=2", "data.features=none", "data.num_workers=1",
            "model.encoder.weights=null", "model.decoder.hidden_dim=32", "model.embedding.dim=16",
            "trainer.max_epochs=1", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "model.test_metrics=[BLEU]", f"hydra.run.dir={run}"]
    result = subprocess.run([sys.executable, "-m", "imcap.train", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=BOUND, env={**os.environ, "IMCAP_ROOT": str(tmp_path)})
    assert result.returncode != 0
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    # it starts as a JPEG does: PIL's JPEG reader says what it found
    assert errors == [f"error: cannot read image {bad}: no marker found (a damaged or truncated file); replace or "
                      "remove the file"], result.stderr[-3000:]
    deadline = time.monotonic() + 60  # the other rank notices its peer is gone and exits too
    while ranks_alive(str(run)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ranks_alive(str(run)) == []
