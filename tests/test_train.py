"""`imcap.train` end to end on the tiny shapes set: artefacts, resume, debug runs, SCST, an Optuna
search that resumes; and `make train` as the README shows it."""

from __future__ import annotations

import json
import re
import shutil
import sys

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from imcap.config_compose import compose_config
from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.train import train
from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY, assert_one_line_error, module, run

pytestmark = pytest.mark.slow
TEST_METRICS = [f"test/BLEU-{k}" for k in range(1, 5)]


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


@pytest.mark.parametrize("data", [[], ["data.hflip=true"]], ids=["plain", "hflip"])
def test_resumed_run_ends_with_the_same_test_metrics(make_cfg, tmp_path, data):
    run = ["trainer.max_epochs=4", "model.optimizer.lr=5e-3", *data]  # hflip: the resumed epochs mirror the same items
    straight = train(make_cfg(*run, out=tmp_path / "straight"))
    crash = [*run, "+callbacks.crash._target_=tests.helpers.callbacks.CrashAtEpoch",
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


def test_hflip_trains_on_a_mirrored_cache_of_the_training_images(tmp_path):
    data = tmp_path / "data"  # a feature cache of its own: other tests fill the shared one, with hflip too
    caches = lambda: set((data / "features").glob("*.npy"))  # noqa: E731
    train(compose_config("train", [*TINY, "debug=fast_dev_run"], tmp_path / "plain", data))
    before = caches()
    metrics = train(compose_config("train", [*TINY, "debug=fast_dev_run", "data.hflip=true"], tmp_path / "hflip", data))
    assert "train/loss" in metrics
    assert before and len(caches() - before) == 1  # the mirrored training images; the others are read as they were


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
    assert_one_line_error(mismatched, "holds another model than this command asks for (model.decoder.hidden_dim=64 "
                          "there, 32 here); resume with the options of the run that wrote it (model.decoder.hidden_dim=64"
                          f", and the others listed in {(run_dir / '.hydra' / 'overrides.yaml').resolve()})")


def test_resuming_with_only_ckpt_path_says_which_data_options_to_repeat_before_building_any(trained_run, tmp_path):
    """`python -m imcap.train ckpt_path=...` alone composes the default data (2,500 shapes): it used to
    generate them and then fail on the model's size; it now stops first, naming the options to repeat."""
    last = trained_run / "checkpoints" / "last.ckpt"
    result = module("train", f"ckpt_path={last}", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, f"error: checkpoint {last} was trained on other data options than this command "
                                  "gives (data.source.num_images.train=48 there, 2000 here;",
                          "resume with the options of the run that wrote it (data.source.num_images.train=48 "
                          "data.source.num_images.val=16 data.source.num_images.test=16 data.source.image_size=64")
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("*.ckpt"))  # no image generated, no run


def test_a_checkpoint_is_never_resumed_on_another_dataset(trained_run, tmp_path):
    """The shapes demo's checkpoint resumed with a command for one's own photos and the same model
    used to train on the photos, read with the demo's vocabulary; it is refused before they are read."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = ["image,caption,split"]
    for i, split in enumerate(["train", "train", "val", "test"]):
        Image.new("RGB", (32, 32), (200, 60 * i, 0)).save(photos / f"{i}.png")
        rows.append(f"{i}.png,a red square,{split}")
    (photos / "captions.csv").write_text("\n".join(rows) + "\n")
    model = [o for o in TINY if not o.startswith("data.source.")]
    cfg = compose_config("train", [*model, "data=custom", f"data.root={photos}", "recipe=shapes", "data.min_freq=1",
                                   "trainer.max_epochs=3", "test=false",
                                   f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}"],
                         tmp_path / "run", tmp_path / "data")
    with pytest.raises(ImcapError, match=r"was trained on data=shapes, and this command gives data=custom; resume "
                                         r"with the options of the run that wrote it \(data=shapes\) and the same"):
        train(cfg)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_the_data_options_a_resume_may_change_are_data_options():
    """A misspelt name in NOT_WHAT_IS_TRAINED_ON would make the resume check refuse a change it allows."""
    from imcap.config_compose import CONF_DIR
    from imcap.train import NOT_WHAT_IS_TRAINED_ON

    def paths(tree: dict, prefix: str = ""):  # every dotted key, a mapping's own included
        for key, value in tree.items():
            yield f"{prefix}{key}"
            if isinstance(value, dict):
                yield from paths(value, f"{prefix}{key}.")

    keys = {k for path in (CONF_DIR / "data").glob("*.yaml") for k in paths(OmegaConf.to_container(OmegaConf.load(path)))}
    assert set(NOT_WHAT_IS_TRAINED_ON) <= keys


def test_resuming_into_another_model_says_which_options_to_repeat_before_building_any_data(trained_run, tmp_path):
    """The tiny run's LSTM checkpoint resumed with model/decoder=transformer used to generate the
    images and extract their features, and only then fail on the weights; it now stops first."""
    last = trained_run / "checkpoints" / "last.ckpt"
    result = module("train", *TINY, "model/decoder=transformer", f"ckpt_path={last}", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, f"error: checkpoint {last} holds another model than this command asks for "
                                  "(model/decoder=lstm there, transformer here; model/attention=additive there, "
                                  "multihead here); resume with the options of the run that wrote it (model/decoder=lstm "
                                  "model/attention=additive", "or start a new run without ckpt_path")
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("*.ckpt"))  # no image, no feature, no run


RESUME_CHANGES = [  # an option changed on resuming a transformer, and what the refusal says (None: allowed)
    ("model.decoder.heads=4", "model.decoder.heads=8 there, 4 here"),  # the weights fit: only this check sees it
    ("model.attention.heads=4", "model.attention.heads=8 there, 4 here"),
    ("model.encoder.finetune=last_k", "model.encoder.finetune=none there, last_k here"),  # other optimiser groups
    ("model.ensemble=2", "model.ensemble=1 there, 2 here"),
    ("model/attention=scaled_dot", "model/attention=multihead there, scaled_dot here"),
    ("model.decoder.dropout=0.3", None),
    ("model.encoder.channels_last=false", None),
    ("model.optimizer.lr=0.1", None),
    ("model.decoding.beam_size=1", None),
    ("model.label_smoothing=0.1", None),
    ("model.feature_dropout=0.2", None),
    ("model.scst.start_epoch=1", None),
]


@pytest.mark.parametrize(("change", "said"), RESUME_CHANGES, ids=[change for change, _ in RESUME_CHANGES])
def test_a_resume_may_change_how_the_model_trains_but_not_what_it_is(make_cfg, change, said):
    from imcap.train import architecture_of, check_resume_model

    stored = architecture_of(OmegaConf.to_container(make_cfg("model/decoder=transformer").model, resolve=True))
    cfg = make_cfg("model/decoder=transformer", change)
    if said is None:
        check_resume_model(stored, cfg, "x.ckpt")
    else:
        with pytest.raises(ImcapError, match=re.escape(f"({said}); resume with the options")):
            check_resume_model(stored, cfg, "x.ckpt")


def test_the_model_options_a_resume_may_change_are_model_options():
    """A misspelt name in NOT_THE_ARCHITECTURE would make the resume check refuse a change it allows."""
    from imcap.config_compose import CONF_DIR
    from imcap.train import NOT_THE_ARCHITECTURE

    keys = {f"{group.name}.{key}" for group in (CONF_DIR / "model").iterdir() if group.is_dir()
            for path in group.glob("*.yaml") for key in OmegaConf.load(path)}
    assert set(NOT_THE_ARCHITECTURE) <= keys


def optuna_search(tmp_path, trials: int) -> None:
    result = module("train", "-m", "hparams_search=optuna", f"hydra.sweeper.n_trials={trials}",
                    "hydra.sweeper.sampler.n_startup_trials=1", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_an_interrupted_optuna_search_continues_the_same_study(tmp_path):
    """`-m hparams_search=optuna` stores its trials in sqlite under IMCAP_ROOT/logs."""
    optuna_search(tmp_path, 2)
    storage = f"sqlite:///{tmp_path}/logs/optuna.db"
    study = optuna.load_study(study_name="imcap-train", storage=storage)
    assert len(study.trials) == 2 and all(t.value is not None for t in study.trials)
    optuna_search(tmp_path, 1)  # e.g. after an interruption: the stored trials are kept and built on
    assert len(optuna.load_study(study_name="imcap-train", storage=storage).trials) == 3


@pytest.mark.slow
def test_reduce_overhead_compile_with_length_buckets_trains_as_eager_does(tmp_path):
    """trainer=gpu's capture settings on the CPU (no GPU here: inductor's CPU code, no CUDA
    graphs): `model.compile={mode: reduce-overhead}` with length buckets trains through
    `python -m imcap.train debug=fast_dev_run` with the losses of the eager run."""
    losses = {}
    for name, compile_option in (("eager", "false"), ("compiled", "{mode: reduce-overhead}")):
        path = tmp_path / f"{name}.losses"
        result = run(sys.executable, "-m", "imcap.train", *TINY, "debug=fast_dev_run", "trainer.fast_dev_run=3",
                     "model.decoder.dropout=0.0", "data.length_buckets=[3,5]", "data.batch_size=8",
                     f"model.compile={compile_option}", "+callbacks.losses._target_=tests.helpers.callbacks.RecordLosses",
                     f"+callbacks.losses.path={path}", f"hydra.run.dir={tmp_path / name}", cwd=tmp_path,
                     env={"PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = [float(x) for x in path.read_text().split()]
    assert len(losses["eager"]) == 3
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=1e-4, atol=1e-5)
