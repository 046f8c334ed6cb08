"""Every config file composes, and what it describes instantiates."""

from __future__ import annotations

import importlib

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from imcap.config_compose import plain_config
from imcap.data.vocab import Vocabulary
from imcap.models.captioner import COMPONENTS, build_captioner
from imcap.models.encoders import _resolve_weights
from imcap.trainer_setup import instantiate_group
from tests.helpers.paths import CONF

TOP_LEVEL = {"train.yaml", "eval.yaml", "caption.yaml", "demo.yaml", "export.yaml"}


def group_options() -> list[tuple[str, str]]:
    """Every (group, option) of conf/; base files (`_name.yaml`), which options extend, are none."""
    options = []
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        if len(rel.parts) > 1 and not path.stem.startswith("_"):
            options.append(("/".join(rel.parts[:-1]), path.stem))
    return options


def test_every_group_directory_is_covered():
    groups = {g for g, _ in group_options()}
    assert {"data", "model", "model/encoder", "model/decoder", "model/attention", "model/embedding",
            "trainer", "logger", "callbacks", "experiment", "hparams_search", "paths", "debug",
            "hydra"} <= groups


@pytest.mark.parametrize("group,option", group_options(), ids=lambda v: str(v))
def test_option_composes_and_instantiates(group, option, make_cfg):
    # the tiny overrides are shapes-specific (experiments may choose other data)
    extra = ["trainer.accelerator=cpu"] if option == "gpu" and not torch.cuda.is_available() else []
    if (group, option) == ("model/attention", "dot"):  # no width of its own: the tiny runs' attention_dim is refused
        extra.append("~model.attention.attention_dim")
    cfg = make_cfg(f"{group}={option}", *extra, tiny=group != "experiment" and not (group == "data" and option != "shapes"))
    vocab = Vocabulary.build([["a", "red", "circle"]])
    if group.startswith("model") or group in ("recipe", "experiment"):
        model = OmegaConf.to_container(cfg.model, resolve=True)
        captioner = build_captioner({k: model[k] for k in COMPONENTS}, vocab, 64, pretrained=False)
        if model["encoder"].get("weights"):  # the named torchvision weights exist
            _resolve_weights(model["encoder"]["name"], model["encoder"]["weights"])
        assert captioner.decoder.vocab_size == len(vocab)
        instantiate(cfg.model.optimizer)
    if group in ("data", "experiment"):
        datamodule = instantiate(cfg.data)
        assert datamodule.batch_size > 0
    if group in ("trainer", "debug", "experiment"):
        instantiate(cfg.trainer, callbacks=instantiate_group(cfg.callbacks), logger=False)
    if group == "logger":
        assert len(instantiate_group(cfg.logger)) == 1
    if group == "callbacks":
        assert instantiate_group(cfg.callbacks)
    if group == "hparams_search":
        sweeper = cfg.hydra.sweeper
        module, _, cls = sweeper.get("_target_", "hydra._internal.core_plugins.basic_sweeper.BasicSweeper").rpartition(".")
        assert hasattr(importlib.import_module(module), cls)
        assert sweeper.params
        if "sampler" in sweeper:
            instantiate(sweeper.sampler)


def test_common_overrides_work(make_cfg, tmp_path):
    cfg = make_cfg("trainer.fast_dev_run=1", "trainer.max_epochs=3", "seed=7", "model/attention=none")
    assert (cfg.trainer.fast_dev_run, cfg.trainer.max_epochs, cfg.seed, cfg.data.seed) == (1, 3, 7, 7)
    assert cfg.model.attention._target_ is None
    assert cfg.model.scheduler.T_max == 3


@pytest.mark.parametrize("overrides,width", [
    (["data=flickr8k", "data.root=x"], 256),  # the real-photo recipe
    (["data=custom", "data.root=x"], 256),
    ([], 512),  # the shapes demo keeps the width its figures were measured with
    (["data=flickr8k", "data.root=x", "model/decoder=topdown"], 512),
    (["data=flickr8k", "data.root=x", "model.decoder.hidden_dim=384"], 384),
])
def test_attention_and_embedding_take_the_decoders_width(make_cfg, overrides, width):
    model = make_cfg(*overrides, tiny=False).model
    assert (model.decoder.hidden_dim, model.attention.attention_dim, model.embedding.dim) == (width,) * 3
    assert make_cfg(*overrides, "model.attention.attention_dim=64", tiny=False).model.attention.attention_dim == 64


@pytest.mark.parametrize("overrides,method,block_trigrams", [
    (["data=flickr8k", "data.root=x"], "beam", True),  # the real-photo recipe
    (["data=coco", "data.root=x"], "beam", True),
    ([], "greedy", False),  # the shapes demo decodes as its figures were measured
])
def test_real_photos_decode_with_beam_search_and_trigram_blocking(make_cfg, overrides, method, block_trigrams):
    decoding = make_cfg(*overrides, tiny=False).model.decoding
    assert (decoding.method, decoding.block_trigrams) == (method, block_trigrams)


@pytest.mark.parametrize("overrides,attention", [
    (["data=flickr8k", "data.root=x"], "AdditiveAttention"),  # the real-photo recipe
    (["data=custom", "data.root=x"], "AdditiveAttention"),
    ([], "AdditiveAttention"),  # the demo
    (["data=flickr8k", "data.root=x", "model/attention=adaptive"], "AdaptiveAttention"),
    (["data=flickr8k", "data.root=x", "model/decoder=topdown"], "AdditiveAttention"),
    # the transformer brings Vaswani et al.'s multi-head attention, and an explicit choice wins
    (["data=flickr8k", "data.root=x", "model/decoder=transformer"], "MultiHeadAttention"),
    (["data=flickr8k", "data.root=x", "model/decoder=transformer", "model/attention=scaled_dot"],
     "ScaledDotAttention"),
])
def test_the_attention_default_comes_with_the_model_and_the_decoder(make_cfg, overrides, attention):
    assert make_cfg(*overrides, tiny=False).model.attention._target_ == f"imcap.models.attention.{attention}"


# What `make train` (the shapes demo) and `python -m imcap.train data=flickr8k` (the real-photo
# recipe) train with: moving a default between config files must leave these as they are.
RECIPES = {
    "demo": ([], {
        "model.encoder.name": "mobilenet_v2", "model.encoder.output_stride": 16,
        "model.attention._target_": "imcap.models.attention.AdditiveAttention", "model.attention.attention_dim": 512,
        "model.decoder._target_": "imcap.models.lstm.LSTMDecoder", "model.decoder.hidden_dim": 512,
        "model.embedding.dim": 512, "model.attention_reg": 1.0,
        "model.decoding": {"method": "greedy", "beam_size": 3, "max_length": 20, "min_length": 1, "length_penalty": 0.0,
                           "block_trigrams": False, "allow_unk": False, "bad_endings": None, "rerank_neighbours": 0,
                           "rerank_beams": 16, "rerank_logprob_weight": 0.02, "rerank_memory_images": 20000},
        "data.batch_size": 64, "data.min_freq": 1, "data.max_vocab_size": None, "data.image_size": 128,
        "data.captions_per_image": 1, "model.optimizer.lr": 2.0e-3, "trainer.max_epochs": 10, "seed": 42,
    }),
    "real_photos": (["data=flickr8k", "data.root=x"], {
        "model.encoder.name": "efficientnet_lite0", "model.encoder.output_stride": None,
        "model.attention._target_": "imcap.models.attention.AdditiveAttention", "model.attention.attention_dim": 256,
        "model.decoder._target_": "imcap.models.lstm.LSTMDecoder", "model.decoder.hidden_dim": 256,
        "model.embedding.dim": 256, "model.attention_reg": 1.0,
        "model.decoding": {"method": "beam", "beam_size": 3, "max_length": 20, "min_length": 1, "length_penalty": 0.0,
                           "block_trigrams": True, "allow_unk": False, "bad_endings": None, "rerank_neighbours": 50,
                           "rerank_beams": 16, "rerank_logprob_weight": 0.02, "rerank_memory_images": 20000},
        "data.batch_size": 32, "data.min_freq": 5, "data.max_vocab_size": 10000, "data.image_size": 224,
        "data.captions_per_image": None, "model.optimizer.lr": 2.0e-3, "trainer.max_epochs": 10, "seed": 42,
    }),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_demo_and_the_real_photo_recipe_keep_their_settings(make_cfg, recipe):
    overrides, expected = RECIPES[recipe]
    cfg = make_cfg(*overrides, tiny=False)
    got = {key: OmegaConf.select(cfg, key) for key in expected}
    assert {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in got.items()} == expected


@pytest.mark.parametrize("overrides,like", [
    (["data=flickr8k", "data.root=x", "recipe=shapes"], []),  # the demo's model on real photos
    (["~recipe"], ["data=flickr8k", "data.root=x"]),  # the real-photo model on the shapes
], ids=["recipe=shapes", "~recipe"])
def test_the_command_line_chooses_the_recipe_whatever_the_data(make_cfg, overrides, like):
    cfg, model_of = make_cfg(*overrides, tiny=False), make_cfg(*like, tiny=False)
    data_of = make_cfg(*[o for o in overrides if "recipe" not in o], tiny=False)
    assert OmegaConf.to_container(cfg.model) == OmegaConf.to_container(model_of.model)
    assert OmegaConf.to_container(cfg.data) == OmegaConf.to_container(data_of.data)


def test_data_options_choose_no_model_part(make_cfg):
    """Only the model config and recipes choose model parts: `imcap.eval data=NAME` (no model
    config) composes a data node and nothing of a model, and resolves (it is saved with the run)."""
    for option in ("flickr8k", "coco", "custom", "flickr30k", "shards"):
        cfg = make_cfg("ckpt_path=x.ckpt", f"data={option}", "data.root=x", name="eval")
        assert "model" not in cfg and cfg.data.root == "x"
        plain_config(cfg)
    for path in sorted((CONF / "data").glob("*.yaml")):
        entries = [str(e) for e in OmegaConf.load(path).get("defaults", [])]
        assert not [e for e in entries if "model" in e], f"{path.name} chooses a model part"


def test_eval_on_the_shapes_composes_and_keeps_the_checkpoints_model(make_cfg):
    """data=shapes brings the demo's recipe, which eval has no model to apply to: it composes
    (it failed with "Could not override 'recipe'"), with the shapes data, and resolves."""
    cfg = make_cfg("ckpt_path=x.ckpt", "data=shapes", name="eval")
    assert cfg.data.source._target_.endswith("ShapesSource")
    plain_config(cfg)


def test_eval_and_caption_configs_compose(make_cfg):
    ev = make_cfg("ckpt_path=x.ckpt", name="eval")
    assert ev.get("data") is None and ev.split == "test"
    ev = make_cfg("ckpt_path=x.ckpt", "data=flickr8k", name="eval")
    assert ev.data.source._target_.endswith("Flickr8kSource")
    cap = make_cfg("ckpt_path=x.ckpt", "images=[a.jpg]", name="caption")
    assert list(cap.images) == ["a.jpg"] and cap.output.endswith("captions.json")
    demo = make_cfg(name="demo")  # serves the newest run, on this machine only
    assert demo.ckpt_path is None and demo.host == "127.0.0.1" and demo.paths.log_dir.endswith("logs")
    exported = make_cfg("ckpt_path=x.ckpt", "out=shared", name="export")
    assert exported.out == "shared"


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("joblib", "JoblibLauncher")])
def test_cluster_and_parallel_launchers_compose(make_cfg, launcher, target):
    cfg = make_cfg(f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher._target_.endswith(target)
    module, _, cls = cfg.hydra.launcher._target_.rpartition(".")
    assert hasattr(importlib.import_module(module), cls)
