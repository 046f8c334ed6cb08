"""One home per default: the YAML config. A Python signature default either equals the value the
YAML gives in the real-photo run (`python -m imcap.train data=flickr8k`; a dataset source: in its
own `data=<name>`), or is None where the YAML's value comes from another option
(`${model.decoder.hidden_dim}`: the caller passes it) or is an object config (`_target_`: None
builds none). A None that builds a typed-options dataclass
(`Decoding`, `SCST`, `ScheduledSampling`) is held to the YAML through that dataclass."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

import pytest
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from imcap.data.vocab import Vocabulary
from imcap.models.captioner import COMPONENTS, Captioner, build_captioner
from imcap.models.search import Decoding
from imcap.registry import components
from imcap.train import build_module
from imcap.training.module import MODULE_OPTIONS, CaptionModule
from imcap.training.scheduled_sampling import ScheduledSampling
from imcap.training.scst import SCST
from tests.helpers.paths import CONF

REAL_PHOTOS = ["data=flickr8k", "data.root=x"]
# the CaptionModule options whose None builds a typed-options dataclass
OPTION_CLASSES = {"decoding": Decoding, "scst": SCST, "scheduled_sampling": ScheduledSampling}


def competing_defaults(cls: Any, node: DictConfig, skip: tuple[str, ...] = ()) -> list[str]:
    """`cls`'s signature defaults that differ from the YAML `node` (see the module docstring)."""
    resolved = OmegaConf.to_container(node, resolve=True)
    found = []
    for name, param in inspect.signature(cls).parameters.items():
        if param.default is param.empty or name not in node or name in skip:
            continue
        value = resolved[name]
        if param.default is None and (OmegaConf.is_interpolation(node, name)
                                      or (isinstance(value, dict) and "_target_" in value)):
            continue
        default = list(param.default) if isinstance(param.default, tuple) else param.default
        if default != value:
            found.append(f"{cls.__qualname__}({name}={param.default!r}) but the YAML says {value!r}")
    return found


def model_options() -> list[tuple[str, str]]:
    """Every registered model component that has a YAML file in conf/model/<kind>/ (the torchvision
    backbone aliases are the `torchvision` option with another name)."""
    return [(kind, name) for kind in COMPONENTS for name in components(kind)
            if (CONF / "model" / kind / f"{name}.yaml").is_file()]


def test_every_model_kind_has_components_with_yaml():
    assert {kind for kind, _ in model_options()} == set(COMPONENTS)


@pytest.mark.parametrize("kind,name", model_options(), ids=lambda v: str(v))
def test_component_defaults_are_the_yamls(make_cfg, kind, name):
    node = make_cfg(*REAL_PHOTOS, f"model/{kind}={name}", tiny=False).model[kind]
    assert competing_defaults(components(kind)[name], node) == []


def test_datamodule_defaults_are_the_yamls(make_cfg):
    data = make_cfg(*REAL_PHOTOS, tiny=False).data
    # data.root is ??? in the YAML: the user's to give (here on the command line)
    assert competing_defaults(get_class(data._target_), data, skip=("root",)) == []


@pytest.mark.parametrize("name", [n for n, cls in components("source").items() if cls.__module__.startswith("imcap.")])
def test_source_defaults_are_the_yamls(make_cfg, name):
    """Each of imcap's registered sources against its conf/data/<name>.yaml `source:` node."""
    source = make_cfg(f"data={name}", "data.root=x", tiny=False).data.source
    assert competing_defaults(components("source")[name], source, skip=("root",)) == []


def test_caption_module_defaults_are_the_yamls(make_cfg):
    model = make_cfg(*REAL_PHOTOS, tiny=False).model
    assert competing_defaults(CaptionModule, model, skip=tuple(OPTION_CLASSES)) == []
    for option, cls in OPTION_CLASSES.items():
        assert cls() == cls(**OmegaConf.to_container(model[option], resolve=True)), option


def test_module_options_are_caption_module_arguments_the_model_config_sets(make_cfg):
    """Every key of conf/model/captioner.yaml reaches CaptionModule: it is a component, the
    ensemble size, or one of MODULE_OPTIONS, which are CaptionModule's own arguments."""
    model = make_cfg(*REAL_PHOTOS, tiny=False).model
    assert set(model) == {*COMPONENTS, "ensemble", *MODULE_OPTIONS}
    assert set(MODULE_OPTIONS) <= set(inspect.signature(CaptionModule).parameters)


@pytest.mark.parametrize("overrides", [[], REAL_PHOTOS], ids=["demo", "real_photos"])
def test_a_captioner_built_in_python_decodes_as_the_cli(make_cfg, overrides):
    """The composed model config passed whole to build_captioner decodes as training does; a
    Captioner given no decoding decodes with the real-photo recipe's, the YAML's default."""
    cfg = make_cfg(*overrides, tiny=not overrides)  # the tiny overrides are the demo's
    vocab = Vocabulary.build([["a", "red", "circle"]])
    cli = build_module(cfg, vocab).decoding
    assert cli == Decoding(**OmegaConf.to_container(cfg.model.decoding, resolve=True))
    built = build_captioner(OmegaConf.to_container(cfg.model, resolve=True), vocab, 64, pretrained=False)
    assert built.decoding == cli
    assert set(built.architecture) == {*COMPONENTS, "ensemble"}  # what a checkpoint stores
    plain = Captioner(built.encoder, built.decoder, vocab, 64)
    real_photos = make_cfg(*REAL_PHOTOS, tiny=False).model.decoding
    assert plain.decoding == Decoding(**OmegaConf.to_container(real_photos, resolve=True))


def test_a_stored_decoding_without_later_keys_decodes_as_when_it_was_written():
    """Checkpoints written before decoding defaulted to the YAML's beam search and reranking
    stored no rerank options: they keep beam search's best caption."""
    old = Decoding.from_stored({"method": "beam", "beam_size": 3, "max_length": 20, "block_trigrams": True})
    assert (old.method, old.rerank_neighbours, old.reranks) == ("beam", 0, False)
    assert Decoding.from_stored(None) == Decoding(method="greedy", block_trigrams=False, rerank_neighbours=0)
    assert Decoding.from_stored(Decoding().to_config()) == Decoding()


@pytest.mark.parametrize("name", ["eval", "caption"])
def test_the_decoding_overrides_name_every_decoding_option(make_cfg, name):
    """imcap.eval and imcap.caption have a decoding.* option for each Decoding field, null: the
    checkpoint's value unless given."""
    cfg = make_cfg("ckpt_path=x.ckpt", "images=[a.jpg]", name=name) if name == "caption" else \
        make_cfg("ckpt_path=x.ckpt", name=name)
    assert OmegaConf.to_container(cfg.decoding) == dict.fromkeys(f.name for f in fields(Decoding))
