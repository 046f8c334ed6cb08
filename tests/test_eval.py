"""`imcap.eval`: a checkpoint alone reproduces its run's test metrics; val split, beam search,
gallery; a corrupt checkpoint is a one-line error; an option the config alone shows wrong is
refused before any checkpoint is read, and leaves no run directory."""

from __future__ import annotations

import json

import pytest

from imcap.errors import ImcapError
from imcap.eval import evaluate
from tests.helpers.runs import assert_one_line_error, module

pytestmark = pytest.mark.slow
TEST_METRICS = [f"test/BLEU-{k}" for k in range(1, 5)]


def test_eval_reproduces_the_test_metrics_exactly(trained, make_cfg, tmp_path):
    out, metrics = trained
    cfg = make_cfg(f"ckpt_path={out}/checkpoints/best.ckpt", "trainer.enable_progress_bar=false",
                   "metrics=[BLEU,ROUGE-L,CIDEr-D]", name="eval", out=tmp_path / "eval")
    evaluated = evaluate(cfg)
    assert {k: evaluated[k] for k in TEST_METRICS} == {k: metrics[k] for k in TEST_METRICS}
    assert json.loads((tmp_path / "eval" / "predictions" / "test.json").read_text()) == json.loads(
        (out / "predictions" / "test.json").read_text())


@pytest.mark.parametrize("finetune", ["none", "last_k"])
def test_eval_of_a_run_on_the_real_photo_encoder_reproduces_its_captions(make_cfg, tmp_path, finetune):
    """EfficientNet-Lite0 (the encoder of every real data option) normalises its inputs to
    [-1, 1]. A new `python -m imcap.eval` process, in another folder, with only the checkpoint,
    must preprocess as training did and write the same captions; with `finetune=last_k`, from the
    cached prefix and the head convolution as the run trained it."""
    import torch
    from omegaconf import OmegaConf

    from imcap.models.encoders import PACKAGED_WEIGHTS, TorchvisionEncoder
    from imcap.train import train

    if PACKAGED_WEIGHTS["efficientnet_lite0"]["IMAGENET1K_V1"].locate() is None:
        pytest.skip("EfficientNet-Lite0 weights not provisioned (make install)")
    run = tmp_path / "run"
    metrics = train(make_cfg("model/encoder=efficientnet_lite0", f"model.encoder.finetune={finetune}",
                             "model.encoder_lr=1e-3", "model.test_metrics=[BLEU,CIDEr-D]", out=run))
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    options = OmegaConf.to_container(OmegaConf.load(run / "config.yaml").model.encoder)
    pretrained = TorchvisionEncoder(**{k: v for k, v in options.items() if k != "_target_"}).state_dict()
    changed = {k for k, v in pretrained.items() if not torch.equal(state[f"captioner.encoder.{k}"], v)}
    assert bool(changed) == (finetune == "last_k")  # the last stage trained; the frozen encoder did not
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = module("eval", f"ckpt_path={run}/checkpoints/best.ckpt", "metrics=[BLEU,CIDEr-D]",
                    "hydra.run.dir=eval", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((elsewhere / "eval" / "predictions" / "test.json").read_text()) == json.loads(
        (run / "predictions" / "test.json").read_text())
    evaluated = json.loads((elsewhere / "eval" / "metrics.json").read_text())
    assert evaluated["test/CIDEr-D"] == pytest.approx(metrics["test/CIDEr-D"], rel=1e-6)


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


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 truncated")
    result = module("eval", f"ckpt_path={tmp_path}/broken.ckpt", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "broken.ckpt is corrupt")


def test_an_unknown_metric_is_refused_before_the_checkpoint_is_read_and_leaves_no_run_directory(tmp_path):
    """A new process, as a user mistypes a metric: the one line names the option and its choices
    (the corrupt checkpoint would be refused next), and no run directory holding only Hydra's
    files and eval.log is left under logs/eval/runs."""
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 truncated")
    result = module("eval", f"ckpt_path={tmp_path}/broken.ckpt", "metrics=[BLEU,nope]", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "metrics=['BLEU', 'nope']: choose one or more of BLEU, METEOR")
    assert not list(tmp_path.glob("logs/eval/runs/*"))


@pytest.mark.parametrize(("override", "says"), [
    ("gallery=abc", "gallery='abc'; give the number of images"),
    ("decoding.beam_size=five", "decoding.beam_size='five' is not an integer"),
    ("ckpt_path=[{ckpt},{ckpt}.missing]", "checkpoint not found: {ckpt}.missing"),
])
def test_options_the_config_alone_refuses_fail_before_any_checkpoint_is_read(make_cfg, tmp_path, override, says):
    """The corrupt first checkpoint is never opened: the option's own one line comes first."""
    ckpt = tmp_path / "broken.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    cfg = make_cfg(f"ckpt_path={ckpt}", override.format(ckpt=ckpt), name="eval", out=tmp_path / "eval")
    with pytest.raises(ImcapError) as refused:
        evaluate(cfg)
    assert says.format(ckpt=ckpt) in str(refused.value)


def test_decoding_that_does_not_fit_the_checkpoints_is_refused_before_the_data_is_read(trained, make_cfg, tmp_path):
    """decoding.min_length=30 is above the checkpoint's max_length (20): refused once the
    checkpoint is read, before data=custom's missing folder is looked at."""
    out, _ = trained
    cfg = make_cfg(f"ckpt_path={out}/checkpoints/best.ckpt", "data=custom", "decoding.min_length=30",
                   name="eval", out=tmp_path / "eval")
    with pytest.raises(ImcapError, match=r"0 <= min_length <= max_length; got 3, 20, 30"):
        evaluate(cfg)


def test_a_list_of_checkpoints_is_evaluated_as_their_ensemble(trained, tmp_path):
    """A new process in another folder, as a user ensembles runs: the ensemble of a checkpoint
    with itself decodes exactly what the checkpoint alone does (the mean of equal word
    distributions is that distribution), so the plumbing adds nothing of its own."""
    out, _ = trained
    best = out / "checkpoints" / "best.ckpt"
    result = module("eval", f"ckpt_path=[{best},{best}]", "metrics=[BLEU,CIDEr-D]", "hydra.run.dir=ens", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Evaluating the ensemble of 2 checkpoints (2 decoders)" in result.stderr + result.stdout
    assert json.loads((tmp_path / "ens" / "predictions" / "test.json").read_text()) == json.loads(
        (out / "predictions" / "test.json").read_text())


def test_ensembling_a_checkpoint_with_another_vocabulary_is_a_one_line_error(trained, tmp_path):
    import torch

    out, _ = trained
    best = out / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, weights_only=True)
    vocab = checkpoint["imcap"]["vocab"]
    vocab[-1], vocab[-2] = vocab[-2], vocab[-1]  # the same words, other ids: its probabilities mean other words
    torch.save(checkpoint, tmp_path / "other.ckpt")
    result = module("eval", f"ckpt_path=[{best},{tmp_path}/other.ckpt]", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "other.ckpt has another vocabulary than", "same captions")


def test_a_reranking_run_carries_its_neighbour_memory_to_eval_caption_and_export(make_cfg, tmp_path, data_dir):
    """Consensus reranking votes with the training captions. The checkpoint carries them: a new
    `python -m imcap.eval` process in another folder writes the run's test captions, and
    `Captioner` (imcap.caption) and an exported folder caption with the same memory."""
    import torch

    from imcap.models.captioner import Captioner
    from imcap.train import train

    run = tmp_path / "run"
    train(make_cfg("model.decoding.method=beam", "model.decoding.rerank_neighbours=3",
                   "model.decoding.rerank_beams=4", "trainer.max_epochs=2", out=run))
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state["captioner.memory.features"].shape[0] == 48  # every training image
    assert state["captioner.memory.image_starts"][-1] == state["captioner.memory.caption_starts"].shape[0] - 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = module("eval", f"ckpt_path={run}/checkpoints/best.ckpt", "metrics=[BLEU,CIDEr-D]",
                    "hydra.run.dir=eval", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = json.loads((run / "predictions" / "test.json").read_text())
    assert json.loads((elsewhere / "eval" / "predictions" / "test.json").read_text()) == predicted

    captioner = Captioner.from_checkpoint(run / "checkpoints" / "best.ckpt")
    assert torch.equal(captioner.memory.words, state["captioner.memory.words"])
    images = sorted(data_dir.rglob("train_000*.png"))[:4]
    captions = [c.text for c in captioner.caption(images)]
    shared = Captioner.from_pretrained(captioner.save_pretrained(tmp_path / "shared"))
    assert torch.equal(shared.memory.features, captioner.memory.features)
    assert [c.text for c in shared.caption(images)] == captions
    captioner.memory = None  # a model without one cannot rerank: it says so
    with pytest.raises(ImcapError, match="rerank_neighbours=0"):
        captioner.caption(images)


def test_a_greedy_run_with_reranking_set_carries_the_memory_for_beams_later(make_cfg, tmp_path, data_dir):
    """Trained and validated greedily, a run whose decoding.rerank_neighbours is set still saves
    the memory: `imcap.caption decoding.method=beam` (or the demo's beam slider) reranks then."""
    from dataclasses import replace

    from imcap.models.captioner import Captioner
    from imcap.train import train

    run = tmp_path / "run"
    train(make_cfg("model.decoding.method=greedy", "model.decoding.rerank_neighbours=3",
                   "model.decoding.rerank_beams=4", out=run))
    captioner = Captioner.from_checkpoint(run / "checkpoints" / "best.ckpt")
    assert len(captioner.memory) == 48
    images = sorted(data_dir.rglob("test_000*.png"))[:2]
    assert all(c.words for c in captioner.caption(images, replace(captioner.decoding, method="beam")))


def test_data_keys_without_a_data_option_change_the_checkpoints_own_data(trained, make_cfg, tmp_path):
    """trainer=gpu sets data.batch_size, data.eval_batch_size, ... (a `_global_` package): eval
    keeps the checkpoint's data option and takes those keys over it (here on the CPU)."""
    out, metrics = trained
    cfg = make_cfg(f"ckpt_path={out}/checkpoints/best.ckpt", "trainer=gpu", "trainer.accelerator=cpu",
                   "trainer.precision=32-true", "trainer.enable_progress_bar=false", "metrics=[BLEU]",
                   "data.eval_batch_size=3", name="eval", out=tmp_path / "eval")
    assert "_target_" not in cfg.data and cfg.data.batch_size == 256
    evaluated = evaluate(cfg)
    assert {k: evaluated[k] for k in TEST_METRICS} == {k: metrics[k] for k in TEST_METRICS}
