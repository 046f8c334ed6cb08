import urllib.error

import pytest
import torch

from imcap import assets
from imcap.errors import ImcapError
from imcap.models.encoders import BACKBONES, TorchvisionEncoder, list_encoders


def test_grid_and_pooled_shapes():
    enc = TorchvisionEncoder("resnet18", weights=None)
    grid, pooled = enc(torch.randn(2, 3, 64, 64))
    assert grid.shape == (2, 4, 512) and pooled.shape == (2, 512)
    torch.testing.assert_close(pooled, grid.mean(1))


def test_grid_size_pools_to_a_fixed_grid():
    grid, _ = TorchvisionEncoder("mobilenet_v2", weights=None, grid_size=3)(torch.randn(1, 3, 160, 160))
    assert grid.shape == (1, 9, 1280)


@pytest.mark.parametrize("name", ["vgg16", "mobilenet_v3_large", "resnet50"])
def test_out_channels_match_the_grid(name):
    enc = TorchvisionEncoder(name, weights=None)
    grid, _ = enc(torch.randn(1, 3, 64, 64))
    assert grid.shape[-1] == enc.out_channels == BACKBONES[name].channels


def test_finetune_policies_choose_trainable_parameters():
    frozen = TorchvisionEncoder("resnet18", weights=None, finetune="none")
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.trainable
    assert not frozen.train().training  # BatchNorm statistics stay fixed
    last = TorchvisionEncoder("resnet18", weights=None, finetune="last_k", finetune_last_k=1)
    trainable = {n.split(".")[1] for n, p in last.named_parameters() if p.requires_grad}
    assert trainable == {"7"}  # layer4 only
    full = TorchvisionEncoder("resnet18", weights=None, finetune="all")
    assert all(p.requires_grad for p in full.parameters()) and full.train().training


def test_list_encoders_with_wildcards():
    assert list_encoders("resnet*") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]


def test_unknown_encoder_and_weights_are_user_errors():
    with pytest.raises(ImcapError, match="model.encoder.name='resnet7'"):
        TorchvisionEncoder("resnet7")
    with pytest.raises(ImcapError, match="IMAGENET9K"):
        TorchvisionEncoder("resnet18", weights="IMAGENET9K")


def test_unavailable_pretrained_weights_fail_fast_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ImcapError, match=r"resnet18-f37072fd.pth.*weights_path.*weights=null"):
        TorchvisionEncoder("resnet18", weights="IMAGENET1K_V1")


def test_weights_path_loads_a_state_dict(tmp_path):
    source = TorchvisionEncoder("resnet18", weights=None)
    import torchvision

    model = torchvision.models.resnet18()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    enc = TorchvisionEncoder("resnet18", weights_path=str(tmp_path / "w.pth"))
    torch.testing.assert_close(enc.trunk[0].weight, model.conv1.weight)
    assert enc.fingerprint() != source.fingerprint()
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ImcapError, match="does not hold weights"):
        TorchvisionEncoder("resnet18", weights_path=str(tmp_path / "bad.pth"))


def test_offline_mobilenet_v2_imagenet_weights_are_provisioned():
    assert assets.check() == [], "run `make install` to provision the offline weights"
    enc = TorchvisionEncoder("mobilenet_v2", weights="IMAGENET1K_V1")
    assert enc.mean == (0.485, 0.456, 0.406)
    assert float(enc.trunk[0][0].weight.abs().sum()) > 0
