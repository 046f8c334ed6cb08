"""A first `make train` as a user starts it: only what is prepared, the progress, the summary
and where the run went (imcap.console silences the library noise, in one place)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.runs import run

REPO = Path(__file__).resolve().parents[1]
# small data, but the console of a real `make train`: progress bars and model summary stay on;
# log_every_n_steps=1 because 3 batches per epoch would warn about a logging interval of 20
TINY_MAKE_ARGS = ("data.source.num_images={train:48,val:16,test:16} data.source.image_size=64 "
                  "trainer.max_epochs=1 trainer.log_every_n_steps=1 model.test_metrics=[BLEU,CIDEr-D]")
# what looks like a warning: Python's warnings (`file.py:12: ...`), a WARNING log record,
# Lightning's tips
WARNING_LINE = re.compile(r"\.py:\d+: |\]\[WARNING\]|Warning|💡")
# warnings a first run may show (none today; an entry needs a reason)
ALLOWED: tuple[str, ...] = ()


def make_train(tmp_path: Path, args: str) -> subprocess.CompletedProcess:
    return run("make", "-s", "-C", str(REPO), "train", f"ARGS={args}", cwd=tmp_path)


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if WARNING_LINE.search(line) and not any(allowed in line for allowed in ALLOWED)]


@pytest.mark.slow
def test_a_first_make_train_prints_no_warning(tmp_path):
    result = make_train(tmp_path, TINY_MAKE_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert warnings_in(result.stderr) == [], result.stderr
    assert "Generating the shapes demo dataset" in result.stderr  # what is being prepared
    assert "Run directory: " in result.stderr  # where the run went
    assert "Trainable params" in result.stdout and "FLOPs" not in result.stdout  # the summary, no zeros
    assert "SPICE" not in result.stderr  # not asked for


@pytest.mark.slow
def test_spice_asked_for_and_unavailable_says_once_how_to_enable_it(tmp_path):
    result = make_train(tmp_path, TINY_MAKE_ARGS.replace("[BLEU,CIDEr-D]", "[BLEU,CIDEr-D,SPICE]"))
    assert result.returncode == 0, result.stderr[-3000:]
    spice = [line for line in result.stderr.splitlines() if "SPICE" in line]
    assert len(spice) == 1, result.stderr
    assert "SPICE skipped" in spice[0] and ("to enable it" in spice[0] or "not on PATH" in spice[0])
