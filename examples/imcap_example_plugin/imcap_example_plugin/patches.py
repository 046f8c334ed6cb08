"""Patches: a frozen random patch embedding as an encoder (a baseline that learns nothing).

Each `patch_size` x `patch_size` patch of the image is projected to `channels` dims by one
convolution drawn from `seed`; the grid is those patches, pooled is their mean. It follows
imcap's encoder contract (`imcap.models.grid_encoder.GridEncoder`): `forward(images) -> (grid
(B, N, C), pooled (B, C))`, `out_channels`, `image_transform`, `identity` (the cache key besides
the weights) and the finetune policy; the base class does caching and frozen BatchNorm, and drops
the `output_stride` a recipe may set (it is for CNN trunks), so this class need not take it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from imcap.data.images import image_transform
from imcap.models.grid_encoder import GridEncoder, read_weights_file, set_trainable
from imcap.registry import register


@register("encoder", "patches")
class PatchEncoder(GridEncoder):
    # the option that names pretrained weights (a file here; none are downloaded): loading a
    # checkpoint clears it, because the checkpoint holds the weights
    WEIGHT_OPTIONS = ("weights_path",)

    def __init__(self, patch_size: int = 8, channels: int = 64, seed: int = 0, weights_path: str | None = None,
                 finetune: str = "none"):
        super().__init__(finetune)
        self.patch_size, self.seed = patch_size, seed
        self.trunk = nn.Conv2d(3, channels, patch_size, stride=patch_size)
        with torch.no_grad():  # the same random projection on every machine
            generator = torch.Generator().manual_seed(seed)
            self.trunk.weight.copy_(torch.randn(self.trunk.weight.shape, generator=generator) / patch_size)
            self.trunk.bias.zero_()
        if weights_path:
            self.trunk.load_state_dict(read_weights_file(weights_path))
        self.out_channels = channels
        set_trainable(self.trunk, [self.trunk], finetune, 1)
        self.train()  # a frozen encoder stays in eval mode

    def image_transform(self, image_size: int) -> Callable:
        return image_transform(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def identity(self) -> str:
        return f"patches|{self.patch_size}|{self.seed}"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.trunk(images).flatten(2).transpose(1, 2)  # (B, N, C)
        return grid, grid.mean(dim=1)
