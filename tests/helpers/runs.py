"""Runs as a user starts them: tiny-run overrides, and entry points in a new process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A model and dataset small enough for a CPU epoch in a second or two.
TINY = [
    "data.source.num_images={train:48,val:16,test:16}",
    "data.source.image_size=64",
    "data.batch_size=16",
    "data.eval_batch_size=16",
    "model.decoder.hidden_dim=64",
    "++model.attention.attention_dim=32",
    "model.embedding.dim=32",
    "trainer.max_epochs=1",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "model.test_metrics=[BLEU,ROUGE-L,CIDEr-D]",  # METEOR's Java start (7 s) is tested in tests/metrics
]


def run(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """A command in a new process, with generated files under `cwd` (IMCAP_ROOT)."""
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "IMCAP_ROOT": str(cwd), **(env or {})})


def module(name: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m imcap.<name> overrides...` in a new process."""
    return run(sys.executable, "-m", f"imcap.{name}", *overrides, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The run failed with a user error: no traceback, and each fragment in what it said."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
