"""model/encoder=timm: any timm backbone's stage as the grid, offline-safe weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from imcap import reachability
from imcap.errors import ImcapError
from imcap.models.timm_encoder import TimmEncoder
from tests.helpers.runs import TINY, every_decoder_trains_from_random_and_from_file, train_offline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache; any attempt to connect fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(reachability.socket, "create_connection", no_network)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """A random-init timm convnext_nano and its state dict saved as safetensors and as torch."""
    folder = tmp_path_factory.mktemp("timm-weights")
    model = timm.create_model("convnext_nano").eval()
    save_file(model.state_dict(), folder / "model.safetensors")
    torch.save(model.state_dict(), folder / "model.pt")
    return model, folder / "model.safetensors", folder / "model.pt"


def test_grid_pooled_and_channels_known_before_any_image():
    enc = TimmEncoder("convnext_nano", pretrained=False)
    assert (enc.out_channels, enc.stride) == (640, 32)  # from timm's feature_info
    grid, pooled = enc(torch.randn(2, 3, 64, 64))
    assert grid.shape == (2, 4, 640) and pooled.shape == (2, 640)
    torch.testing.assert_close(pooled, grid.mean(1))


def test_out_index_gives_a_finer_grid_and_refuses_a_missing_stage():
    enc = TimmEncoder("convnext_nano", pretrained=False, out_index=-2)
    assert (enc.out_channels, enc.stride) == (320, 16)
    assert enc(torch.randn(1, 3, 64, 64))[0].shape == (1, 16, 320)
    with pytest.raises(ImcapError, match=r"out_index=7 is out of range: .* has 4 feature stages") as info:
        TimmEncoder("convnext_nano", pretrained=False, out_index=7)
    assert "\n" not in str(info.value)


def test_fixed_size_vits_are_built_for_the_data_image_size():
    enc = TimmEncoder("vit_tiny_patch16_224", pretrained=False, image_size=64)
    assert enc(torch.randn(1, 3, 64, 64))[0].shape == (1, 16, 192)  # 4 x 4 patches of 16 pixels
    with pytest.raises(ImcapError, match="model.encoder.image_size=96"):
        enc.image_transform(96)


def test_preprocessing_is_timms_data_config_on_the_whole_image():
    from PIL import Image

    enc = TimmEncoder("vit_tiny_patch16_224", pretrained=False, image_size=32)
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 16, 32))  # a blue left quarter: a centre crop would lose it
    x = enc.image_transform(32)(image)
    assert torch.allclose(x[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # mean = std = 0.5 for this ViT
    cropped = TimmEncoder("vit_tiny_patch16_224", pretrained=False, image_size=32, crop=True).image_transform(32)(image)
    assert torch.allclose(cropped[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_unknown_model_and_tag_are_one_line_errors():
    with pytest.raises(ImcapError, match="not a timm model"):
        TimmEncoder("convnext_nanoo", pretrained=False)
    with pytest.raises(ImcapError, match=r"convnext_nano.bogus.*in12k_ft_in1k") as info:
        TimmEncoder("convnext_nano.bogus", pretrained=False)
    assert "\n" not in str(info.value)


def test_finetune_policies():
    frozen = TimmEncoder("convnext_nano", pretrained=False)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.train().training
    last = TimmEncoder("convnext_nano", pretrained=False, finetune="last_k", finetune_last_k=1)
    assert {n.split(".")[1] for n, p in last.named_parameters() if p.requires_grad} == {"stages_3"}
    vit = TimmEncoder("vit_tiny_patch16_224", pretrained=False, image_size=32, finetune="last_k", finetune_last_k=2)
    trainable = [n for n, p in vit.named_parameters() if p.requires_grad]
    assert {n.split("blocks.")[1].split(".")[0] for n in trainable} == {"10", "11"}  # the last two of 12 blocks
    full = TimmEncoder("convnext_nano", pretrained=False, finetune="all")
    assert all(p.requires_grad for p in full.parameters()) and full.train().training


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_weights_path_round_trip(weights, kind):
    model, safetensors_file, torch_file = weights
    enc = TimmEncoder("convnext_nano", weights_path=str(safetensors_file if kind == "safetensors" else torch_file))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[3], intermediates_only=True)[0]  # (B, C, H, W)
        torch.testing.assert_close(enc(x)[0], expected.flatten(2).transpose(1, 2))


def test_cache_key_follows_the_weights(weights, tmp_path):
    model, safetensors_file, torch_file = weights
    a = TimmEncoder("convnext_nano", weights_path=str(safetensors_file))
    assert a.fingerprint() == TimmEncoder("convnext_nano", weights_path=str(torch_file)).fingerprint()
    changed = {k: v.clone() for k, v in model.state_dict().items()}
    changed["stages.3.blocks.1.conv_dw.weight"] += 0.01
    save_file(changed, tmp_path / "changed.safetensors")
    assert TimmEncoder("convnext_nano", weights_path=str(tmp_path / "changed.safetensors")).fingerprint() != a.fingerprint()
    assert TimmEncoder("convnext_nano", pretrained=False).fingerprint() != a.fingerprint()


def test_weights_of_another_model_are_refused_in_one_line(tmp_path):
    save_file(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.safetensors")
    with pytest.raises(ImcapError, match=r"resnet18.safetensors does not hold weights for timm convnext_nano: "
                                         r"no tensor 'fc.weight' among its 122") as info:
        TimmEncoder("convnext_nano", weights_path=str(tmp_path / "resnet18.safetensors"))
    assert "\n" not in str(info.value)
    small = TimmEncoder("convnext_atto", pretrained=False)  # the same layout, other widths
    torch.save(timm.create_model("convnext_atto").state_dict(), tmp_path / "atto.pt")
    with pytest.raises(ImcapError, match=r"atto.pt does not hold weights for timm convnext_nano: Missing key\(s\) in state_dict: \"stages.2.blocks.6") as info:
        TimmEncoder("convnext_nano", weights_path=str(tmp_path / "atto.pt"))
    assert "\n" not in str(info.value) and small.out_channels == 320
    with pytest.raises(ImcapError, match="does not exist"):
        TimmEncoder("convnext_nano", weights_path=str(tmp_path / "absent.safetensors"))


def test_unreachable_pretrained_weights_fail_at_once_in_one_line(offline, tmp_path):
    with pytest.raises(ImcapError) as info:
        TimmEncoder("convnext_nano", pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("timm/convnext_nano.in12k_ft_in1k", "model.safetensors", str(tmp_path / "hf"),
                     "HF_HUB_OFFLINE", "model.encoder.weights_path=FILE", "model.encoder.pretrained=false"):
        assert fragment in message


def test_no_connection_fails_at_once_without_a_download(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))

    def refused(address, timeout):
        assert timeout <= reachability.PROBE_SECONDS
        raise ConnectionRefusedError(111, "Connection refused")

    def download(*args, **kwargs):
        raise AssertionError("downloaded although the probe failed")

    monkeypatch.setattr(reachability.socket, "create_connection", refused)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    with pytest.raises(ImcapError, match="huggingface.co cannot be reached: ConnectionRefusedError: .*Connection refused"):
        TimmEncoder("convnext_nano", pretrained=True)


def test_pretrained_weights_in_the_hugging_face_cache_load_offline(offline, weights, tmp_path):
    """The layout `hf download` writes (and a copied cache folder has): refs/main names a snapshot."""
    model, safetensors_file, _ = weights
    repo = tmp_path / "hf" / "models--timm--convnext_nano.in12k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model.safetensors").write_bytes(safetensors_file.read_bytes())
    enc = TimmEncoder("convnext_nano", pretrained=True)
    assert enc.fingerprint() == TimmEncoder("convnext_nano", weights_path=str(safetensors_file)).fingerprint()


@pytest.mark.slow
def test_fast_dev_run_offline_with_every_decoder_random_and_from_a_file(weights, tmp_path):
    _, safetensors_file, _ = weights
    every_decoder_trains_from_random_and_from_file(tmp_path, safetensors_file, "model/encoder=timm",
                                                   "model.encoder.name=convnext_nano", "model.encoder.pretrained=false")


@pytest.mark.slow
def test_a_checkpoint_carries_the_encoder_weights_without_the_file(weights, make_cfg, tmp_path):
    """Trained from a local weights file, the checkpoint needs neither the file nor the network."""
    from imcap.models.captioner import Captioner
    from imcap.train import train

    model, safetensors_file, _ = weights
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(safetensors_file.read_bytes())
    cfg = make_cfg("model/encoder=timm", "model.encoder.name=convnext_nano", f"model.encoder.weights_path={copy}",
                   "data.source.num_images={train:16,val:8,test:8}", "test=false", out=tmp_path / "run")
    train(cfg)
    copy.unlink()
    captioner = Captioner.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(captioner.encoder, TimmEncoder)
    torch.testing.assert_close(captioner.encoder.trunk.stem_0.weight, model.stem[0].weight)
    image = tmp_path / "red.png"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(image)
    assert isinstance(captioner.caption([image])[0].text, str)


@pytest.mark.slow
def test_cli_says_in_one_line_what_to_place_where(tmp_path):
    result = train_offline(tmp_path, *TINY, "model/encoder=timm", "trainer.fast_dev_run=true")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "timm/convnext_nano.in12k_ft_in1k" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_the_demo_recipes_output_stride_is_noted_and_unused(make_cfg, caplog):
    """conf/recipe/shapes.yaml cuts torchvision CNNs at stride 16; `model/encoder=timm` on the
    demo still builds, says it does not use the option, and keeps its own stage (and cache key)."""
    assert make_cfg("model/encoder=timm").model.encoder.output_stride == 16
    with caplog.at_level(logging.WARNING, logger="imcap.models.encoders"):
        enc = TimmEncoder("convnext_nano", pretrained=False, output_stride=16)
    assert "output_stride=16 is for torchvision encoders; timm convnext_nano ignores it" in caplog.text
    assert enc.identity() == TimmEncoder("convnext_nano", pretrained=False).identity()
