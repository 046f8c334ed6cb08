"""model/encoder=open_clip: CLIP visual towers, their patch tokens as the grid, offline-safe weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imcap import reachability
from imcap.data.features import extract_features
from imcap.errors import ImcapError
from imcap.models.clip_encoder import OpenClipEncoder
from tests.helpers.runs import every_decoder_trains_from_random_and_from_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """A random-init open_clip ViT-B-32 (whole CLIP) and its state dict as safetensors and torch."""
    folder = tmp_path_factory.mktemp("clip-weights")
    model = open_clip.create_model("ViT-B-32").eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    return model, folder / "open_clip_model.safetensors", folder / "open_clip_pytorch_model.bin"


@pytest.fixture
def tiny_resnet(tmp_path) -> str:
    """A one-block-per-stage ResNet CLIP tower registered with open_clip under a test name."""
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "imcap-test-RN-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "imcap-test-RN-tiny.json")
    return "imcap-test-RN-tiny"


@pytest.mark.parametrize("pooled,channels", [("class_token", 768), ("embedding", 512), ("mean", 768)])
def test_patch_tokens_as_the_grid_and_the_pooled_choice(clip, pooled, channels):
    model, safetensors_file, _ = clip
    enc = OpenClipEncoder("ViT-B-32", pretrained=None, weights_path=str(safetensors_file), pooled=pooled)
    assert enc.out_channels == channels  # before any image
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        grid, vector = enc(x)
        tokens = model.visual.forward_intermediates(x, indices=[11], normalize_intermediates=True,
                                                    intermediates_only=True, output_fmt="NLC",
                                                    output_extra_tokens=True)
    assert grid.shape == (2, 49, channels) and vector.shape == (2, channels)  # 7 x 7 patches of 32 pixels
    if pooled != "embedding":
        torch.testing.assert_close(grid, tokens["image_intermediates"][0])
    if pooled == "class_token":
        torch.testing.assert_close(vector, tokens["image_intermediates_prefix"][0][:, 0])
    elif pooled == "mean":
        torch.testing.assert_close(vector, grid.mean(1))


def test_embedding_is_the_clip_image_embedding(clip):
    model, _, torch_file = clip
    enc = OpenClipEncoder("ViT-B-32", pretrained=None, weights_path=str(torch_file), pooled="embedding")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        grid, pooled = enc(x)
        torch.testing.assert_close(pooled, model.encode_image(x))
    assert grid.shape == (1, 49, 512)


def test_a_chosen_block_and_its_range(clip):
    model, safetensors_file, _ = clip
    enc = OpenClipEncoder("ViT-B-32", pretrained=None, weights_path=str(safetensors_file), block=5)
    assert len(enc.trunk.transformer.resblocks) == 6  # the later blocks are dropped
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.visual.forward_intermediates(x, indices=[5], normalize_intermediates=True,
                                                      intermediates_only=True, output_fmt="NLC")
        torch.testing.assert_close(enc(x)[0], expected["image_intermediates"][0])
    with pytest.raises(ImcapError, match=r"block=12 is out of range: ViT-B-32 has 12 blocks"):
        OpenClipEncoder("ViT-B-32", pretrained=None, block=12)


def test_weights_round_trip_and_the_cache_key(clip, tmp_path):
    model, safetensors_file, torch_file = clip
    a = OpenClipEncoder("ViT-B-32", pretrained=None, weights_path=str(safetensors_file), image_size=64)
    b = OpenClipEncoder("ViT-B-32", pretrained=None, weights_path=str(torch_file), image_size=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    assert a.fingerprint() == b.fingerprint()
    visual_only = {k[len("visual."):]: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    visual_only["transformer.resblocks.11.mlp.c_fc.bias"] = visual_only["transformer.resblocks.11.mlp.c_fc.bias"] + 1
    torch.save(visual_only, tmp_path / "visual.pt")  # a tower's own state dict loads too
    changed = OpenClipEncoder("ViT-B-32", pretrained=None, weights_path=str(tmp_path / "visual.pt"), image_size=64)
    assert changed.fingerprint() != a.fingerprint()
    with pytest.raises(ImcapError, match="visual.pt does not hold weights for open_clip ViT-B-16: ") as info:
        OpenClipEncoder("ViT-B-16", pretrained=None, weights_path=str(tmp_path / "visual.pt"), image_size=64)
    assert "\n" not in str(info.value)


def test_tag_sets_quickgelu_and_preprocessing_with_a_local_file(clip):
    _, safetensors_file, _ = clip
    enc = OpenClipEncoder("ViT-B-32", pretrained="openai", weights_path=str(safetensors_file), image_size=64)
    block = enc.trunk.transformer.resblocks[0]
    assert type(block.mlp.gelu).__name__ == "QuickGELU"  # as OpenAI trained it
    image = Image.new("RGB", (128, 64), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 32, 64))  # a blue left quarter: a centre crop would lose it
    x = enc.image_transform(64)(image)
    assert x.shape == (3, 64, 64)
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(x[:, 0, 0], (torch.tensor([0.0, 0.0, 1.0]) - mean) / std)
    with pytest.raises(ImcapError, match="model.encoder.image_size=96"):
        enc.image_transform(96)


def test_unknown_names_tags_and_options_are_one_line_errors():
    with pytest.raises(ImcapError, match="not an open_clip model"):
        OpenClipEncoder("ViT-B-33", pretrained=None)
    with pytest.raises(ImcapError, match=r"pretrained='laion9b' is not an open_clip tag of ViT-B-32; .*openai"):
        OpenClipEncoder("ViT-B-32", pretrained="laion9b")
    with pytest.raises(ImcapError, match="pooled='cls'"):
        OpenClipEncoder("ViT-B-32", pretrained=None, pooled="cls")


def test_unreachable_pretrained_weights_fail_at_once_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(reachability.socket, "create_connection", no_network)
    with pytest.raises(ImcapError) as info:
        OpenClipEncoder("ViT-B-32", pretrained="openai")
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors", str(tmp_path),
                     "model.encoder.weights_path=FILE", "model.encoder.pretrained=null"):
        assert fragment in message


def test_resnet_towers_give_the_last_feature_map(tiny_resnet):
    enc = OpenClipEncoder(tiny_resnet, pretrained=None, finetune="last_k")  # pooled: mean, the default here
    assert enc.out_channels == 256  # width 8 * 32
    grid, pooled = enc(torch.randn(2, 3, 96, 96))  # any size: the attention pool is not used
    assert grid.shape == (2, 9, 256)
    torch.testing.assert_close(pooled, grid.mean(1))
    assert {n.split(".")[0] for n, p in enc.named_parameters() if p.requires_grad} == {"trunk"}
    assert {n.split(".")[1] for n, p in enc.named_parameters() if p.requires_grad} == {"layer4"}
    with pytest.raises(ImcapError, match="ResNet tower: .* set model.encoder.pooled=mean"):
        OpenClipEncoder(tiny_resnet, pretrained=None, pooled="class_token")


def test_the_feature_cache_keeps_the_class_token(clip, tmp_path):
    """Frozen features are cached once; a pooled vector that is not the grid mean is cached with them."""
    _, safetensors_file, _ = clip
    enc = OpenClipEncoder("ViT-B-32", pretrained=None, weights_path=str(safetensors_file), image_size=64)
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (80, 60), colour).save(paths[-1])
    transform = enc.image_transform(64)
    rows = extract_features(enc, paths, transform, tmp_path / "cache", enc.fingerprint(repr(transform)),
                            dtype="float32")
    assert rows.shape == (3, 5, 768)  # the class token, then 2 x 2 patches
    grid, pooled = enc.from_cache(torch.from_numpy(np.array(rows)))
    with torch.no_grad():
        expected = enc(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
    torch.testing.assert_close((grid, pooled), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_vit_b_32_fast_dev_run_offline_with_every_decoder_random_and_from_a_file(clip, tmp_path):
    _, safetensors_file, _ = clip
    every_decoder_trains_from_random_and_from_file(tmp_path, safetensors_file, "model/encoder=open_clip",
                                                   "model.encoder.name=ViT-B-32", "model.encoder.pretrained=null")


def test_the_demo_recipes_output_stride_is_noted_and_unused(make_cfg, caplog):
    """conf/recipe/shapes.yaml cuts torchvision CNNs at stride 16; `model/encoder=open_clip` on
    the demo still builds, says it does not use the option, and keeps its patch grid."""
    assert make_cfg("model/encoder=open_clip").model.encoder.output_stride == 16
    with caplog.at_level(logging.WARNING, logger="imcap.models.encoders"):
        enc = OpenClipEncoder("ViT-B-32", pretrained=None, image_size=64, output_stride=16)
    assert "output_stride=16 is for torchvision encoders; open_clip ViT-B-32 ignores it" in caplog.text
    assert enc(torch.randn(1, 3, 64, 64))[0].shape[1] == 4  # 2x2 patches of 32 px


def test_a_checkpoint_rebuilds_the_tags_activation_and_preprocessing_without_its_weights(clip):
    """build_captioner(pretrained=False), as a checkpoint is loaded: the tag's QuickGELU and
    preprocessing stay, no weight file is looked for (none is reachable here), and the model
    computes what the trained one did."""
    from imcap.data.vocab import Vocabulary
    from imcap.models.captioner import build_captioner
    from tests.helpers.decoders import architecture

    _, safetensors_file, _ = clip
    arch = architecture("lstm", "additive")
    arch["encoder"] = {"_target_": "imcap.models.clip_encoder.OpenClipEncoder", "name": "ViT-B-32",
                       "pretrained": "openai", "weights_path": str(safetensors_file), "image_size": 64}
    vocab = Vocabulary.build([["a", "dog"]])
    trained = build_captioner(arch, vocab, 64).eval()
    arch["encoder"]["weights_path"] = "/nowhere/visual.safetensors"  # sent by someone else: not on this machine
    rebuilt = build_captioner(arch, vocab, 64, pretrained=False).eval()
    rebuilt.load_state_dict(trained.state_dict())
    assert type(rebuilt.encoder.trunk.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert rebuilt.encoder.preprocess == trained.encoder.preprocess
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encoder(x)[0], trained.encoder(x)[0])
