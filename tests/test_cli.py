"""The entry points as a user runs them: one-line errors for user mistakes, and `make train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def run(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "IMCAP_ROOT": str(cwd), **(env or {})})


def module(name: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", f"imcap.{name}", *overrides, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unknown_option_names_it(tmp_path):
    result = module("train", "model.decoder.hiden_dim=3", cwd=tmp_path)
    assert_one_line_error(result, "hiden_dim")
    assert result.returncode == 2  # as for every user error (README)
    assert result.stderr.splitlines() == [
        "error: Could not override 'model.decoder.hiden_dim'; To append to your config use "
        "+model.decoder.hiden_dim=3; Key 'hiden_dim' is not in struct; full_key: model.decoder.hiden_dim"]


def test_unknown_group_option_lists_the_choices(tmp_path):
    result = module("train", "model/attention=bogus", cwd=tmp_path)
    assert_one_line_error(result, "bogus", "additive, dot")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(("bug", "shown"), [("BugInConstructor", "ZeroDivisionError: a bug in a Hydra-built"),
                                            ("BugWhileHandlingUserError", "KeyError: 'missing'")])
def test_a_bug_in_a_constructor_keeps_its_traceback(bug, shown, tmp_path):
    result = run(sys.executable, "-m", "imcap.train", *TINY, f"+callbacks.bug._target_=tests.helpers.{bug}",
                 cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and shown in result.stderr, result.stderr[-3000:]
    assert "error: " not in result.stderr


def test_missing_data_root_says_what_to_place_where(tmp_path):
    result = module("train", "data=flickr8k", f"data.root={tmp_path}/nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, f"error: data.root={tmp_path}/nowhere does not exist",
                          f"`make data dataset=flickr8k root={tmp_path}/nowhere`")
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 truncated")
    result = module("eval", f"ckpt_path={tmp_path}/broken.ckpt", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "broken.ckpt is corrupt")


def test_unreadable_image_names_the_file(tmp_path):
    # a foreign checkpoint is refused before images are read
    import torch

    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    result = module("caption", f"ckpt_path={tmp_path}/foreign.ckpt", f"images=[{tmp_path}/x.jpg]", cwd=tmp_path)
    assert_one_line_error(result, "image not found", "x.jpg")
    (tmp_path / "x.jpg").write_text("not a jpeg")
    result = module("caption", f"ckpt_path={tmp_path}/foreign.ckpt", f"images=[{tmp_path}/x.jpg]", cwd=tmp_path)
    assert_one_line_error(result, "was not written by imcap training")


def test_make_train_then_eval_caption_and_mismatched_resume(tmp_path):
    """The README path: `make train` (shortened by ARGS), then eval and caption its checkpoint."""
    args = " ".join([*(o for o in TINY if "progress" not in o), "trainer.max_epochs=5", "model.optimizer.lr=5e-3",
                     f"hydra.run.dir={tmp_path}/run"])
    result = run("make", "-C", str(ROOT), "train", f"ARGS={args}", cwd=tmp_path, env={"IMCAP_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/BLEU-1"] > 0.15  # learned something: an untrained model scores about 0.1
    for artefact in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "predictions/test.json", "vocab.json",
                     "config.yaml"):
        assert (run_dir / artefact).is_file(), artefact
    assert (tmp_path / "data" / "features").is_dir()  # generated under IMCAP_ROOT, not the checkout

    evaluated = module("eval", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"hydra.run.dir={tmp_path}/eval",
                       "metrics=[BLEU,ROUGE-L,CIDEr-D]", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    eval_metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {k: eval_metrics[k] for k in eval_metrics} == {k: metrics[k] for k in eval_metrics}

    image = sorted((tmp_path / "data" / "shapes").rglob("test_00000.png"))[0]
    captioned = module("caption", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"images=[{image}]",
                       f"hydra.run.dir={tmp_path}/cap", cwd=tmp_path)
    assert captioned.returncode == 0, captioned.stderr[-3000:]
    predicted = json.loads((run_dir / "predictions" / "test.json").read_text())[0]["caption"]
    line = captioned.stdout.strip().splitlines()[-1]
    assert line.startswith(str(image)) and line.split("\t")[1] == predicted

    mismatched = module("train", *TINY, "model.decoder.hidden_dim=32", f"ckpt_path={run_dir}/checkpoints/last.ckpt",
                        f"hydra.run.dir={tmp_path}/mismatch", cwd=tmp_path)
    assert mismatched.returncode == 2
    assert_one_line_error(mismatched, "does not match the model architecture")
