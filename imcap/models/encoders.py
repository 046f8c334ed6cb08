"""CNN encoders: torchvision backbones returning a spatial grid (B, N, C) and a pooled (B, C).

Weights come through torchvision's weights API (each weights entry carries its URL and
preprocessing statistics, which the encoder adopts); offline, a weight file that is already in
torch's hub cache (MobileNetV2 is provisioned there by `make install`) or `weights_path`.
Asking for pretrained weights that cannot be had is an error, never a silent random init.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from imcap.data.images import image_transform
from imcap.errors import ImcapError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FINETUNE = ("none", "last_k", "all")


def _children_trunk(model: nn.Module) -> nn.Module:  # ResNets: everything before avgpool/fc
    return nn.Sequential(*list(model.children())[:-2])


def _features_trunk(model: nn.Module) -> nn.Module:  # MobileNets, EfficientNets
    return model.features


def _vgg_trunk(model: nn.Module) -> nn.Module:  # conv5 before the last max-pool (14x14 at 224)
    return model.features[:-1]


@dataclass(frozen=True)
class Backbone:
    trunk: Callable[[nn.Module], nn.Module]
    channels: int


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone(_features_trunk, 1280),
    "mobilenet_v3_large": Backbone(_features_trunk, 960),
    "resnet18": Backbone(_children_trunk, 512),
    "resnet34": Backbone(_children_trunk, 512),
    "resnet50": Backbone(_children_trunk, 2048),
    "resnet101": Backbone(_children_trunk, 2048),
    "resnet152": Backbone(_children_trunk, 2048),
    "vgg16": Backbone(_vgg_trunk, 512),
    "vgg19": Backbone(_vgg_trunk, 512),
    "vgg16_bn": Backbone(_vgg_trunk, 512),
    "vgg19_bn": Backbone(_vgg_trunk, 512),
}


def list_encoders(pattern: str = "*") -> list[str]:
    """Encoder names matching a shell-style wildcard, e.g. `list_encoders("resnet*")`."""
    return sorted(fnmatch.filter(BACKBONES, pattern))


def _resolve_weights(name: str, weights: str):
    try:
        return torchvision.models.get_model_weights(name)[weights]
    except KeyError as e:
        options = [w.name for w in torchvision.models.get_model_weights(name)]
        raise ImcapError(f"model.encoder.weights={weights!r} is not a {name} weight; choose one of "
                         f"{options}, or null for a random init") from e


def _load_pretrained(name: str, weights: str) -> tuple[dict, object]:
    entry = _resolve_weights(name, weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    try:
        return entry.get_state_dict(progress=True, check_hash=True), entry
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise ImcapError(
            f"pretrained {name} weights {weights} are not in {cached.parent} and could not be "
            f"downloaded ({type(e).__name__}: {e}); place {cached.name} there, pass "
            "model.encoder.weights_path=FILE, or set model.encoder.weights=null for a random init"
        ) from e


class TorchvisionEncoder(nn.Module):
    """A torchvision backbone as a captioning encoder.

    finetune: `none` (frozen, BatchNorm in eval mode: features can be cached), `last_k`
    (the last `finetune_last_k` stages of the trunk train), or `all`.
    grid_size: adaptive-average-pool the feature map to grid_size x grid_size (None: native).
    """

    def __init__(
        self,
        name: str = "mobilenet_v2",
        weights: str | None = "IMAGENET1K_V1",
        weights_path: str | None = None,
        finetune: str = "none",
        finetune_last_k: int = 1,
        grid_size: int | None = None,
        channels_last: bool = True,
    ):
        super().__init__()
        if name not in BACKBONES:
            raise ImcapError(f"model.encoder.name={name!r} is unknown; choose one of {list_encoders()}")
        if finetune not in FINETUNE:
            raise ImcapError(f"model.encoder.finetune={finetune!r}; choose one of {FINETUNE}")
        self.name, self.finetune, self.grid_size = name, finetune, grid_size
        self.channels_last = channels_last
        model = torchvision.models.get_model(name, weights=None)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        if weights_path:
            self._load_file(model, weights_path)
        elif weights:
            state, entry = _load_pretrained(name, weights)
            model.load_state_dict(state)
            preprocess = entry.transforms()
            self.mean, self.std = tuple(preprocess.mean), tuple(preprocess.std)
        self.trunk = BACKBONES[name].trunk(model)
        self.out_channels = BACKBONES[name].channels
        if channels_last:
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
        self._set_trainable(finetune_last_k)
        self.train()  # a frozen encoder starts (and stays) in eval mode

    @staticmethod
    def _load_file(model: nn.Module, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except FileNotFoundError as e:
            raise ImcapError(f"model.encoder.weights_path={path} does not exist") from e
        except (RuntimeError, OSError, ValueError, AttributeError) as e:
            first = str(e).strip().splitlines()[0]
            raise ImcapError(f"model.encoder.weights_path={path} does not hold weights for this "
                             f"backbone: {first}") from e

    def _set_trainable(self, last_k: int) -> None:
        for p in self.trunk.parameters():
            p.requires_grad = self.finetune == "all"
        if self.finetune == "last_k":
            stages = [m for m in self.trunk.children() if any(True for _ in m.parameters())]
            for stage in stages[-last_k:]:
                for p in stage.parameters():
                    p.requires_grad = True

    @property
    def trainable(self) -> bool:
        return self.finetune != "none"

    def train(self, mode: bool = True) -> TorchvisionEncoder:
        # A frozen encoder keeps BatchNorm statistics fixed, so cached features stay valid.
        super().train(mode and self.trainable)
        return self

    def image_transform(self, image_size: int) -> Callable:
        return image_transform(image_size, self.mean, self.std)

    def fingerprint(self, transform_desc: str = "") -> str:
        """Hash of everything that determines the features: weights, grid, transform."""
        h = hashlib.sha256(f"{self.name}|{self.grid_size}|{transform_desc}".encode())
        for key, tensor in self.trunk.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        fmap = self.trunk(images)  # (B, C, H', W')
        if self.grid_size:
            fmap = F.adaptive_avg_pool2d(fmap, self.grid_size)
        grid = fmap.flatten(2).transpose(1, 2).contiguous()  # (B, N, C)
        return grid, grid.mean(dim=1)  # pooled: (B, C)
