"""study.py as a user runs it: a new process per command, killed with SIGKILL half-way and run
again (it resumes: finished runs are not trained again), user mistakes as one-line errors, and
the options that pick pairs and image splits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.attention_variants import study
from imcap.config_compose import compose_config
from imcap.errors import ImcapError
from imcap.models.decoder import valid_pairs
from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY, assert_one_line_error, run

SCRIPT = ROOT / "experiments" / "attention_variants" / "study.py"
# the tiny demo; study.py sets the quiet options itself
SMALL = [o for o in TINY if o.split("=")[0] not in ("callbacks.progress_bar", "trainer.enable_progress_bar",
                                                     "trainer.enable_model_summary")]


def command(tmp_path, data_dir) -> list[str]:
    return [sys.executable, str(SCRIPT), "--pairs", "lstm-none,lstm-additive", "--seeds", "1,2", "--epochs", "1",
            "--out", str(tmp_path / "runs"), "--data-dir", str(data_dir), "--report-dir", str(tmp_path / "report"),
            "--name", "tiny", *SMALL]


@pytest.mark.slow
def test_a_killed_study_resumes_without_training_finished_runs_again(tmp_path, data_dir):
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "README.md").write_text("# Study\n\n<!-- study:tiny -->\nstale block\n<!-- /study:tiny -->\nend\n",
                                          encoding="utf-8")
    runs = tmp_path / "runs"
    first = subprocess.Popen(command(tmp_path, data_dir), cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "IMCAP_ROOT": str(tmp_path)})
    deadline = time.monotonic() + 600
    while not list(runs.glob("*/*/*/result.json")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, first.stderr.read()[-3000:]  # still running: more runs to go
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    (done,) = runs.glob("*/*/*/result.json")  # one run finished before the kill
    before = done.read_bytes(), done.stat().st_mtime_ns

    second = run(*command(tmp_path, data_dir), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 runs, 3 trained now, 1 already done" in second.stdout
    assert (done.read_bytes(), done.stat().st_mtime_ns) == before  # not trained again
    folders = sorted("/".join(p.parts[-3:-1]) for p in runs.glob("*/*/*/result.json"))
    assert folders == ["lstm-additive/seed1", "lstm-additive/seed2", "lstm-none/seed1", "lstm-none/seed2"]
    for result_file in runs.glob("*/*/*/result.json"):
        result = json.loads(result_file.read_text(encoding="utf-8"))
        assert 0 <= result["test/BLEU-4"] <= 1 and result["decoder_params"] > 0
        assert ("test/grounding" in result) == (result["attention"] != "none")
        assert not (result_file.parent / "checkpoints" / "last.ckpt").exists()  # kept for resuming only
        assert (result_file.parent / "checkpoints" / "best.ckpt").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/*/*/result.json")}
    third = run(*command(tmp_path, data_dir), cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "4 runs, 0 trained now, 4 already done" in third.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # the report covers every run: table with n=2 per pair, conclusions, plot, README block
    results = json.loads((report_dir / "results-tiny.json").read_text(encoding="utf-8"))
    assert sorted((r["decoder"], r["attention"], r["seed"]) for r in results) == [
        ("lstm", "additive", 1), ("lstm", "additive", 2), ("lstm", "none", 1), ("lstm", "none", 2)]
    table = (report_dir / "table-tiny.md").read_text(encoding="utf-8")
    assert "| lstm | additive | 2 |" in table and "| lstm | none | 2 |" in table
    assert "Each pair against the reference lstm-additive" in table
    assert (report_dir / "results-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (report_dir / "README.md").read_text(encoding="utf-8")
    assert "stale block" not in readme and table in readme and readme.endswith("<!-- /study:tiny -->\nend\n")


@pytest.mark.parametrize("args, fragments", [
    (["--pairs", "lstm-bogus"], ["--pairs", "lstm-bogus", "lstm-additive"]),
    (["--data", "coco", "--root", "no-such-folder"], ["--root", "no-such-folder"]),
    (["--splits", "0,1"], ["--splits", "data=flickr8k"]),
])
def test_user_mistakes_are_one_line_errors(args, fragments, tmp_path):
    assert_one_line_error(run(sys.executable, str(SCRIPT), *args, cwd=tmp_path), *fragments)


def test_default_pairs_are_every_valid_pair_on_the_demo_and_the_photo_set_on_photos():
    assert study.parse_pairs("default", "shapes") == valid_pairs()
    photos = study.parse_pairs("default", "flickr8k")
    assert len(photos) == len(set(photos)) == 9 and set(photos) <= set(valid_pairs())
    assert ("lstm", "additive") in photos  # the reference the conclusions compare with
    assert study.parse_pairs("topdown-dot,lstm-none", "coco") == [("topdown", "dot"), ("lstm", "none")]


def test_split_seeds_are_refused_where_the_folder_fixes_the_split(tmp_path):
    (tmp_path / "Images").mkdir()
    assert study.parse_args(["--data", "flickr8k", "--root", str(tmp_path), "--splits", "0,1"]).splits == "0,1"
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("a.jpg\n", encoding="utf-8")
    with pytest.raises(ImcapError, match="split files"):
        study.parse_args(["--data", "flickr8k", "--root", str(tmp_path), "--splits", "0,1"])


def test_the_gpu_study_uses_the_gpu_trainer_and_the_recipe_with_only_the_study_fixed(tmp_path):
    args = study.parse_args(["--data", "flickr8k", "--root", str(tmp_path), "--accelerator", "gpu", "--epochs", "5"])
    base = study.base_overrides(args)
    assert base[:3] == ["data=flickr8k", f"data.root={tmp_path.resolve()}", "trainer=gpu"]
    assert [o for o in base if not o.startswith(("callbacks.progress_bar", "trainer.enable_"))][3:] == [
        "model.decoding.rerank_neighbours=0", "trainer.max_epochs=5"]  # variants judged by their own best caption
    cfg = compose_config("train", base)  # what each run composes, before its pair and seed
    assert (cfg.trainer.accelerator, cfg.trainer.max_epochs, cfg.data.root) == ("gpu", 5, str(tmp_path.resolve()))
    assert cfg.model.decoding.rerank_neighbours == 0
