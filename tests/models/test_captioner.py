"""Building the captioner from model configs: every valid decoder x attention pair builds, the
others are refused in one line that lists the valid pairs (derived, not hand-kept), and a
checkpoint naming a component's old module path still loads."""

from __future__ import annotations

import pytest
import torch

from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.models.captioner import CHECKPOINT_KEY, MOVED_TARGETS, build_captioner, load_checkpoint
from imcap.models.decoder import describe_valid_pairs
from imcap.models.lstm import LSTMDecoder
from tests.helpers.decoders import INVALID, PAIRS, architecture, pair_id

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = Vocabulary.build([["a", "red", "circle"]])


@pytest.mark.parametrize("pair", INVALID, ids=pair_id)
def test_pairs_without_meaning_are_refused_with_the_valid_ones_listed(pair):
    with pytest.raises(ImcapError) as info:
        build_captioner(architecture(*pair), VOCAB, 64, pretrained=False)
    message = str(info.value)
    assert f"model/decoder={pair[0]} does not work with model/attention={pair[1]}" in message
    assert describe_valid_pairs() in message and "\n" not in message
    assert "lstm: none, adaptive, additive" in message and "transformer: additive, dot" in message


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_valid_pairs_build_from_configs(pair):
    captioner = build_captioner(architecture(*pair), VOCAB, 64, pretrained=False)
    grid = torch.randn(2, 4, 512)
    logits, _ = captioner(grid, grid.mean(1), torch.zeros(2, 3, dtype=torch.long))
    assert logits.shape == (2, 3, len(VOCAB))


def test_a_checkpoint_naming_the_old_lstm_module_still_loads(tmp_path):
    old = next(t for t, new in MOVED_TARGETS.items() if new.endswith(".LSTMDecoder"))
    arch = architecture("lstm", "additive")
    arch["decoder"]["_target_"] = old  # imcap.models.decoders, before the split
    path = tmp_path / "old.ckpt"
    torch.save({CHECKPOINT_KEY: {"architecture": arch, "vocab": VOCAB.itos, "image_size": 64},
                "state_dict": {}}, path)
    stored = load_checkpoint(path)[CHECKPOINT_KEY]["architecture"]
    assert stored["decoder"]["_target_"] == MOVED_TARGETS[old]
    assert type(build_captioner(stored, VOCAB, 64, pretrained=False).decoder) is LSTMDecoder


def test_a_checkpoint_rebuilds_the_input_normalisation_its_encoder_weights_were_trained_with(tmp_path):
    """EfficientNet-Lite0's weights expect inputs in [-1, 1], not ImageNet's mean and std. A
    model rebuilt from a checkpoint (imcap.eval, imcap.caption, the hub) reads no weight file,
    yet must preprocess and encode an image exactly as the trained one did."""
    from PIL import Image

    from imcap.models.captioner import Captioner
    from imcap.models.encoders import PACKAGED_WEIGHTS

    if PACKAGED_WEIGHTS["efficientnet_lite0"]["IMAGENET1K_V1"].locate() is None:
        pytest.skip("EfficientNet-Lite0 weights not provisioned (make install)")
    arch = architecture("lstm", "additive")
    arch["encoder"].update(name="efficientnet_lite0", weights="IMAGENET1K_V1")
    trained = build_captioner(arch, VOCAB, 64).eval()
    path = tmp_path / "run.ckpt"
    torch.save({CHECKPOINT_KEY: {"architecture": trained.architecture, "vocab": VOCAB.itos, "image_size": 64},
                "state_dict": {f"captioner.{k}": v for k, v in trained.state_dict().items()}}, path)
    rebuilt = Captioner.from_checkpoint(path)

    image = Image.new("RGB", (80, 64), (200, 30, 90))
    x, y = (c.encoder.image_transform(64)(image) for c in (trained, rebuilt))
    torch.testing.assert_close(y, x)
    assert x.min() < -0.5  # scaled to [-1, 1] as Lite0 was trained (ImageNet scaling gives about -1.4)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encoder(y[None])[0], trained.encoder(x[None])[0])
    # the same feature cache key: evaluating a run reuses the features it trained on
    transform = repr(trained.encoder.image_transform(64))
    assert rebuilt.encoder.fingerprint(transform) == trained.encoder.fingerprint(transform)


def test_a_folder_as_ckpt_path_is_one_line_saying_which_file_to_pass(tmp_path):
    exported = tmp_path / "my-captioner"  # what imcap.export writes: it captions, it does not train or evaluate
    exported.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.json"):
        (exported / name).write_text("{}")
    with pytest.raises(ImcapError, match=r"ckpt_path=.*my-captioner is a folder written by imcap\.export.*training "
                                         r"checkpoint it was exported from"):
        load_checkpoint(exported)
    run = tmp_path / "run"  # a training run's folder: the file inside is named
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"")
    with pytest.raises(ImcapError, match=r"is a folder, not a checkpoint file; pass the file, e\.g\. ckpt_path=.*run/"
                                         r"checkpoints/best\.ckpt$"):
        load_checkpoint(run)
