"""A stored config names registered components in their slots, and holds plain values only."""

from __future__ import annotations

import pytest

from imcap.errors import ImcapError
from imcap.stored_config import check_stored_config

LSTM = "imcap.models.lstm.LSTMDecoder"
GOOD = {
    "architecture": {
        "encoder": {"_target_": "imcap.models.encoders.TorchvisionEncoder", "name": "mobilenet_v2"},
        "decoder": {"_target_": LSTM, "hidden_dim": 64, "dropout": 0.5},
        "attention": {"_target_": None},
        "embedding": {"_target_": "imcap.models.embeddings.LearnedEmbedding", "dim": 32},
    },
    "data": {"_target_": "imcap.data.datamodule.CaptionDataModule",
             "source": {"_target_": "imcap.data.sources.shapes.ShapesSource", "num_images": {"train": 4}}},
    "vocab": ["<pad>", "a"],
}


def with_change(path: str, value) -> dict:
    import copy

    tree = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = tree
    for key in parents:
        node = node[key]
    node[last] = value
    return tree


def test_registered_components_in_their_slots_pass():
    check_stored_config(GOOD, "checkpoint x.ckpt")


@pytest.mark.parametrize(("path", "value", "named"), [
    ("data.seed", {"_target_": "torch.save", "_args_": ["x", "/tmp/p"]}, "data.seed._target_"),
    ("architecture.decoder.dropout", {"_target_": "numpy.save"}, "architecture.decoder.dropout._target_"),
    ("architecture.decoder._target_", "torch.save", "architecture.decoder._target_"),
    ("architecture.decoder._target_", "imcap.models.attention.AdditiveAttention", "architecture.decoder._target_"),
    ("data.source._target_", 3, "data.source._target_"),
    ("architecture.encoder._partial_", True, "architecture.encoder._partial_"),
    ("architecture.encoder._args_", ["x"], "architecture.encoder._args_"),
    ("data.source.root", "${oc.env:HOME}", "data.source.root"),
    ("architecture.decoder.hidden_dim", b"64", "architecture.decoder.hidden_dim"),
    ("vocab", ["<pad>", {"_target_": LSTM}], "vocab[1]._target_"),
])
def test_code_or_a_misplaced_component_is_refused_naming_the_key(path, value, named):
    with pytest.raises(ImcapError, match="checkpoint x.ckpt is refused") as caught:
        check_stored_config(with_change(path, value), "checkpoint x.ckpt")
    assert named in str(caught.value) and "\n" not in str(caught.value)
