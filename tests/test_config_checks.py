"""A stored config names registered components in their slots, and holds plain values only."""

from __future__ import annotations

import pytest

from imcap.config_checks import check_stored_config
from imcap.errors import ImcapError

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


@pytest.fixture
def stored_checkpoint(make_cfg, tmp_path):
    """Write a checkpoint changed by `change(meta)` (its stored imcap config); returns its path."""
    import torch

    from tests.helpers.checkpoints import write_untrained_checkpoint

    checkpoint = write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), tmp_path / "good.ckpt")

    def write(change) -> str:
        change(checkpoint["imcap"])
        torch.save(checkpoint, tmp_path / "crafted.ckpt")
        return str(tmp_path / "crafted.ckpt")

    return write


def test_training_stores_the_format_this_imcap_reads(stored_checkpoint):
    import torch

    from imcap.config_checks import FORMAT

    assert torch.load(stored_checkpoint(lambda meta: None), weights_only=True)["imcap"]["format"] == FORMAT


def _image(tmp_path) -> str:
    from tests.helpers.images import write_image

    return str(write_image(tmp_path / "photo.png"))


@pytest.mark.slow
@pytest.mark.parametrize(("entry", "change", "said"), [
    ("caption", lambda meta: meta["decoding"].update(diversity_penalty=0.5),
     "stores decoding.diversity_penalty, an option this imcap (0.1.0) does not know (a newer imcap wrote it); "
     "upgrade imcap (pip install -U imcap) to read it"),
    ("eval", lambda meta: meta["decoding"].update(beam_size="five"),
     "stores decoding.beam_size='five', which is not an integer"),
    ("caption", lambda meta: meta.update(format=2),
     "has format=2, a newer format than this imcap (0.1.0) reads (up to 1); upgrade imcap"),
    ("eval", lambda meta: meta.update(format="1.5"), "has format='1.5', not a format number"),
])
def test_stored_values_this_imcap_cannot_read_are_one_line(stored_checkpoint, tmp_path, entry, change, said):
    from tests.helpers.runs import assert_one_line_error, module

    crafted = stored_checkpoint(change)
    extra = [f"images=[{_image(tmp_path)}]"] if entry == "caption" else []
    result = module(entry, f"ckpt_path={crafted}", *extra, cwd=tmp_path)
    assert_one_line_error(result, f"error: checkpoint {crafted} {said}")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_a_decoding_override_of_the_wrong_type_is_one_line(stored_checkpoint, tmp_path):
    from tests.helpers.runs import assert_one_line_error, module

    result = module("caption", f"ckpt_path={stored_checkpoint(lambda meta: None)}", f"images=[{_image(tmp_path)}]",
                    "decoding.beam_size=five", cwd=tmp_path)
    assert_one_line_error(result, "error: decoding.beam_size='five' is not an integer; e.g. decoding.beam_size=3")
