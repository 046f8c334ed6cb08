"""End-to-end training, evaluation, resume and captioning on the tiny shapes set."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from imcap.caption import caption_images
from imcap.data.vocab import Vocabulary
from imcap.eval import evaluate
from imcap.models.captioner import Captioner
from imcap.train import train

pytestmark = pytest.mark.slow
TEST_METRICS = [f"test/BLEU-{k}" for k in range(1, 5)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """One tiny two-epoch run shared by the tests below."""
    from tests.conftest import TINY, compose_config

    out = tmp_path_factory.mktemp("trained")
    cfg = compose_config("train", [*TINY, "trainer.max_epochs=2"], out, data_dir)
    return out, train(cfg)


def test_run_directory_holds_every_artefact(trained):
    out, metrics = trained
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(TEST_METRICS) | {"val/BLEU-4", "val/CIDEr-D", "val/CIDEr-D_best", "test/CIDEr-D", "test/ROUGE-L", "train/loss"} <= set(metrics)
    assert 0 <= metrics["test/grounding"] <= 1 and 0 < metrics["test/grounding_chance"] < 1
    predictions = json.loads((out / "predictions" / "test.json").read_text())
    assert len(predictions) == 16 and {"image_id", "caption"} == set(predictions[0])
    assert isinstance(predictions[0]["caption"], str)
    vocab = Vocabulary.load(out / "vocab.json")
    assert Vocabulary.load(out / "checkpoints" / "vocab.json") == vocab and "circle" in vocab.stoi
    assert OmegaConf.load(out / "config.yaml").trainer.max_epochs == 2
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1  # the newest epoch, whether or not it was the best
    assert (out / "csv" / "metrics.csv").is_file()


def test_eval_reproduces_the_test_metrics_exactly(trained, make_cfg, tmp_path):
    out, metrics = trained
    cfg = make_cfg(f"ckpt_path={out}/checkpoints/best.ckpt", "trainer.enable_progress_bar=false",
                   "metrics=[BLEU,ROUGE-L,CIDEr-D]", name="eval", out=tmp_path / "eval")
    evaluated = evaluate(cfg)
    assert {k: evaluated[k] for k in TEST_METRICS} == {k: metrics[k] for k in TEST_METRICS}
    assert json.loads((tmp_path / "eval" / "predictions" / "test.json").read_text()) == json.loads(
        (out / "predictions" / "test.json").read_text())


def test_eval_on_the_val_split_with_beam_search_and_a_gallery(trained, make_cfg, tmp_path):
    out, _ = trained
    cfg = make_cfg(f"ckpt_path={out}/checkpoints/best.ckpt", "split=val", "trainer.enable_progress_bar=false",
                   "decoding.method=beam", "decoding.beam_size=3", "gallery=4", "metrics=[BLEU,CIDEr-D]",
                   name="eval", out=tmp_path / "eval")
    assert set(evaluate(cfg)) == {*(f"val/BLEU-{k}" for k in range(1, 5)), "val/CIDEr-D", "val/grounding",
                                  "val/grounding_chance"}
    predictions = json.loads((tmp_path / "eval" / "predictions" / "val.json").read_text())
    page = (tmp_path / "eval" / "gallery.html").read_text()
    assert page.count('class="card"') == 4 and page.count("data:image/jpeg;base64,") == 4
    assert all(p["caption"] in page for p in predictions[:4])


def test_validation_scores_the_weights_of_that_epoch(trained, make_cfg, tmp_path):
    """The last epoch's val metrics are those of last.ckpt: validation decodes with the current
    weights (fused AdamW updates them without bumping version counters)."""
    out, metrics = trained
    cfg = make_cfg(f"ckpt_path={out}/checkpoints/last.ckpt", "split=val", "trainer.enable_progress_bar=false",
                   "metrics=[BLEU,ROUGE-L,CIDEr-D]", name="eval", out=tmp_path / "eval")
    evaluated = evaluate(cfg)
    for key in ("val/BLEU-4", "val/CIDEr-D"):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-6), key


def test_captioner_loads_without_lightning_and_captions_files(trained, make_cfg, tmp_path):
    out, _ = trained
    images = sorted(p for p in (out.parent).rglob("test_0000*.png"))[:2]
    captioner = Captioner.from_checkpoint(out / "checkpoints" / "best.ckpt")
    captions = captioner.caption(images)
    assert len(captions) == 2 and all(c.text == " ".join(c.words) for c in captions)
    cfg = make_cfg(f"ckpt_path={out}/checkpoints/best.ckpt", f"images=[{images[0]},{images[1]}]",
                   "attention_plots=true", name="caption", out=tmp_path / "cap")
    results = caption_images(cfg)
    written = json.loads((tmp_path / "cap" / "captions.json").read_text())
    assert [w["caption"] for w in written] == [c.text for _, c in results] == [c.text for c in captions]
    assert len(list((tmp_path / "cap" / "attention").glob("*.png"))) == sum(bool(c.words) for c in captions)


def test_resumed_run_ends_with_the_same_test_metrics(make_cfg, tmp_path):
    run = ["trainer.max_epochs=4", "model.optimizer.lr=5e-3"]
    straight = train(make_cfg(*run, out=tmp_path / "straight"))
    crash = [*run, "+callbacks.crash._target_=tests.helpers.CrashAtEpoch",
             "+callbacks.crash.epoch=2"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(*crash, out=tmp_path / "killed"))
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    shutil.rmtree(tmp_path / "killed" / "predictions", ignore_errors=True)
    resumed = train(make_cfg(*run, f"ckpt_path={last}", out=tmp_path / "killed"))
    assert {k: resumed[k] for k in TEST_METRICS} == {k: straight[k] for k in TEST_METRICS}
    assert resumed["val/CIDEr-D_best"] == straight["val/CIDEr-D_best"]
    assert resumed["train/loss"] == straight["train/loss"]  # the last step's loss
    assert straight["test/BLEU-1"] > 0.15  # learned something (untrained: about 0.1), not a degenerate match


def test_fast_dev_run_runs_the_whole_path_in_one_batch(make_cfg, tmp_path):
    metrics = train(make_cfg("debug=fast_dev_run", "model/attention=none", out=tmp_path / "fdr"))
    assert "train/loss" in metrics


def test_show_and_tell_has_no_grounding_metric(make_cfg, tmp_path):
    metrics = train(make_cfg("model/attention=none", "trainer.limit_train_batches=1", out=tmp_path / "st"))
    assert "test/BLEU-4" in metrics and "test/grounding" not in metrics


def test_scst_phase_follows_cross_entropy(make_cfg, tmp_path):
    metrics = train(make_cfg("model.scst.start_epoch=1", "model.scst.num_samples=2", "model.scst.baseline=mean",
                             "trainer.max_epochs=2", "model.scheduled_sampling.start_epoch=0",
                             "model.scheduled_sampling.increase_every=1", out=tmp_path / "scst"))
    assert "train/scst_reward" in metrics and "train/scst_baseline" in metrics
    assert metrics["val/CIDEr-D_best"] >= metrics["val/CIDEr-D"] - 1e-9


def test_the_progress_bar_can_be_switched_off(make_cfg, tmp_path):
    rich = "callbacks.progress_bar={_target_:pytorch_lightning.callbacks.RichProgressBar}"  # as in the defaults
    metrics = train(make_cfg("debug=fast_dev_run", rich, "trainer.enable_progress_bar=false", out=tmp_path / "quiet"))
    assert "train/loss" in metrics
