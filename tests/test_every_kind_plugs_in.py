"""Every kind of component is one class of one's own, registered with `@register`, plus one YAML
in one's own config directory: nothing of imcap is edited, and the composed config is built into
that class and passes the checkpoint allowlist (a metric is one class and no YAML)."""

from __future__ import annotations

import textwrap

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from imcap import registry
from imcap.config_checks import check_stored_config
from imcap.data.vocab import Vocabulary
from imcap.plugins import load_plugins
from imcap.train import build_module

MODULE = "my_components_of_every_kind"

CLASSES = '''
from imcap.data.datamodule import CaptionDataModule
from imcap.data.sources.shapes import ShapesSource
from imcap.metrics.coco import BleuScore
from imcap.models.attention import AdditiveAttention
from imcap.models.embeddings import LearnedEmbedding
from imcap.models.encoders import TorchvisionEncoder
from imcap.models.lstm import LSTMDecoder
from imcap.registry import register


@register("encoder", "my_encoder")
class MyEncoder(TorchvisionEncoder):
    pass


@register("decoder", "my_decoder")
class MyDecoder(LSTMDecoder):
    pass


@register("attention", "my_attention")
class MyAttention(AdditiveAttention):
    pass


@register("embedding", "my_embedding")
class MyEmbedding(LearnedEmbedding):
    pass


@register("source", "my_source")
class MySource(ShapesSource):
    pass


@register("datamodule", "my_datamodule")
class MyDataModule(CaptionDataModule):
    pass


@register("metric", "my-bleu")
class MyBleu(BleuScore):
    keys = ("my-bleu-1", "my-bleu-2", "my-bleu-3", "my-bleu-4")
'''

# one YAML per kind, each extending imcap's option of the same group (found through the search path)
YAMLS = {
    "model/encoder/my_encoder.yaml": f"defaults: [torchvision]\n_target_: {MODULE}.MyEncoder\nweights: null\n",
    "model/decoder/my_decoder.yaml": f"defaults: [lstm]\n_target_: {MODULE}.MyDecoder\n",
    "model/attention/my_attention.yaml": f"defaults: [additive]\n_target_: {MODULE}.MyAttention\n",
    "model/embedding/my_embedding.yaml": f"defaults: [learned]\n_target_: {MODULE}.MyEmbedding\n",
    "data/my_data.yaml": textwrap.dedent(f"""\
        defaults: [shapes, _self_]
        _target_: {MODULE}.MyDataModule
        source:
          _target_: {MODULE}.MySource
        """),
}
CHOICES = ["model/encoder=my_encoder", "model/decoder=my_decoder", "model/attention=my_attention",
           "model/embedding=my_embedding", "data=my_data", "model.test_metrics=[BLEU,my-bleu]"]


@pytest.fixture
def my_components(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(CLASSES)
    for path, text in YAMLS.items():
        (tmp_path / "conf" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "conf" / path).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "conf"
    for kind in registry.KINDS:
        for name in [n for n, cls in registry.components(kind).items() if cls.__module__ == MODULE]:
            registry._registry[kind].pop(name)


def test_each_kind_is_one_class_and_one_yaml_of_ones_own(my_components, make_cfg):
    cfg = make_cfg(f"hydra.searchpath=[file://{my_components}]", f"plugins=[{MODULE}]", *CHOICES)
    load_plugins(cfg.plugins)
    for kind, name in [("encoder", "my_encoder"), ("decoder", "my_decoder"), ("attention", "my_attention"),
                       ("embedding", "my_embedding"), ("source", "my_source"), ("datamodule", "my_datamodule"),
                       ("metric", "my-bleu")]:
        assert name in registry.names(kind), kind
    # what a checkpoint of this run stores is allowed back in
    parts = OmegaConf.to_container(cfg.model, resolve=True)
    parts = {part: parts[part] for part in ("encoder", "decoder", "attention", "embedding")}
    check_stored_config(parts, "checkpoint x.ckpt", "architecture")
    check_stored_config(OmegaConf.to_container(cfg.data, resolve=True), "checkpoint x.ckpt", "data")
    module = build_module(cfg, Vocabulary.build([["a", "red", "circle"]]))
    captioner = module.captioner
    assert [type(part).__name__ for part in (captioner.encoder, captioner.decoder, captioner.decoder.attention,
                                             captioner.decoder.embedding)] == [
        "MyEncoder", "MyDecoder", "MyAttention", "MyEmbedding"]
    datamodule = instantiate(cfg.data)
    assert (type(datamodule).__name__, type(datamodule.source).__name__) == ("MyDataModule", "MySource")
    assert type(module.test_metrics.scorers["my-bleu"]).__name__ == "MyBleu"
