"""The encoder contract every encoder family implements (`GridEncoder`), and what the families
share: reading weight files, the finetune policy, cutting a CNN trunk at an output stride, and
the feature-cache fingerprint."""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from imcap.errors import ImcapError

log = logging.getLogger(__name__)

FINETUNE = ("none", "last_k", "all")


def rename_modules(state: dict[str, torch.Tensor], names: dict[str, str], prefix: str = "") -> dict[str, torch.Tensor]:
    """`state` with each key `prefix + module + "." + param` whose module is in `names` renamed."""
    renamed = {}
    for key, value in state.items():
        module, _, param = key[len(prefix):].rpartition(".")
        if key.startswith(prefix) and module in names:
            key = f"{prefix}{names[module]}.{param}"
        renamed[key] = value
    return renamed


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
    """Say that an encoder which chooses its grid another way does not use `output_stride` (a
    recipe may set it for whichever encoder is chosen: conf/recipe/shapes.yaml does)."""
    if output_stride is not None:
        log.warning("model.encoder.output_stride=%s is for torchvision encoders; %s ignores it (%s)",
                    output_stride, encoder, instead)


def weights_fingerprint(identity: str, module: nn.Module, names: dict[str, str] | None = None) -> str:
    """sha256 of `identity` (library, model, options, transform) and every tensor of `module`
    (its modules renamed by `names`): the cache key of the features it computes."""
    h = hashlib.sha256(identity.encode())
    for key, tensor in rename_modules(module.state_dict(), names or {}).items():
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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A family whose __init__ takes no `output_stride` need not accept it only to ignore it:
        # the recipe's value is dropped here, with a note.
        init = cls.__dict__.get("__init__")
        params = inspect.signature(init).parameters if init else {"output_stride": None}
        if "output_stride" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return

        @functools.wraps(init)
        def without_output_stride(self, *args, output_stride: int | None = None, **options):
            note_unused_output_stride(output_stride, cls.__name__, "it does not cut a CNN trunk")
            init(self, *args, **options)

        cls.__init__ = without_output_stride

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

    def rename_old_keys(self, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """`state` (of the module holding this encoder at `prefix`) with the keys of checkpoints
        written before this encoder renamed its modules brought up to date; here: unchanged."""
        return state

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


