"""Any timm backbone as a captioning encoder, through timm's uniform feature interface.

`timm.create_model(name, features_only=True, out_indices=(out_index,))` gives the feature map of
one stage of any of timm's models (CNNs, ViTs, hybrids) in (B, C, H, W), and its `feature_info`
the channels and stride of that stage before any image is seen. The grid is that map flattened,
pooled its mean. Preprocessing is timm's data config for the model (mean, std, interpolation),
applied to the whole image resized to a square, as imcap's other encoders do (`crop=true`: timm's
own resize and centre crop).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from imcap.errors import ImcapError
from imcap.models import weight_files
from imcap.models.encoders import (
    GridEncoder,
    load_error,
    note_unused_output_stride,
    read_weights_file,
    set_trainable,
)
from imcap.registry import register

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
# timm is imported where it is used: importing it costs seconds, and every run imports this
# module (the registry does).


def _pretrained_cfg(name: str):
    """timm's pretrained config of `name` (`arch` or `arch.tag`), or a one-line error."""
    import timm

    if not timm.is_model(name):
        raise ImcapError(f"model.encoder.name={name!r} is not a timm model; list them with "
                         f"`python -c \"import timm; print(timm.list_models('{name.split('.')[0][:4]}*'))\"`")
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown tag
        arch = name.split(".")[0]
        raise ImcapError(f"model.encoder.name={name!r}: {e} Tags: {timm.list_pretrained(arch + '.*')}") from e


def weights_file(name: str) -> weight_files.WeightsFile:
    """Where timm keeps the pretrained weights of `name`: a Hugging Face repository (model.safetensors,
    else pytorch_model.bin) or, for a few models, a URL cached by torch.hub."""
    cfg = _pretrained_cfg(name)
    what = f"timm {name}"
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return weight_files.WeightsFile(what, random_init="model.encoder.pretrained=false")
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
        return weight_files.WeightsFile(what, cfg.hf_hub_id, files, random_init="model.encoder.pretrained=false")
    return weight_files.WeightsFile(what, url=cfg.url, url_cache=Path(torch.hub.get_dir()) / "checkpoints",
                           random_init="model.encoder.pretrained=false")


def stages_of(module: nn.Module) -> list[nn.Module]:
    """The sequence of stages in a feature model, for `finetune=last_k`: its children that hold
    parameters, where one child holding most of them (the `blocks` of a ViT inside timm's feature
    wrapper) is replaced by its own stages."""
    def size(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    children = [c for c in module.children() if size(c)]
    for i, child in enumerate(children):
        if size(child) > size(module) / 2 and len([c for c in child.children() if size(c)]) > 1:
            return children[:i] + stages_of(child) + children[i + 1:]
    return children


@register("encoder", "timm")
class TimmEncoder(GridEncoder):
    """A timm model's stage `out_index` (default the last) as the grid.

    pretrained: timm's weights for `name` (`arch` takes timm's default tag, `arch.tag` a given
    one), found in the Hugging Face cache or downloaded when online; weights_path: a local
    safetensors or torch file with a timm state dict of this model (what `model.state_dict()`
    saves, or model.safetensors from the hub) instead. image_size: for models with a fixed input
    size (ViTs), the size they are built for (their position embeddings resampled); None keeps
    timm's. finetune: `none` | `last_k` (the last `finetune_last_k` stages, with any
    normalisation layer after them) | `all`. output_stride: TorchvisionEncoder's cut, unused
    here (out_index chooses the stage), accepted so that a recipe may set it.
    """

    WEIGHT_OPTIONS = ("pretrained", "weights_path")

    def __init__(
        self,
        name: str = "convnext_nano",
        pretrained: bool = True,
        weights_path: str | None = None,
        out_index: int = -1,
        finetune: str = "none",
        finetune_last_k: int = 1,
        image_size: int | None = None,
        crop: bool = False,
        output_stride: int | None = None,
    ):
        from timm.data import resolve_data_config

        super().__init__(finetune)
        note_unused_output_stride(output_stride, f"timm {name}",
                                  "model.encoder.out_index=-2 is stride 16 for most CNNs")
        cfg = _pretrained_cfg(name)
        self.name, self.out_index, self.crop = name, out_index, crop
        kwargs = {}
        if image_size and cfg is not None and cfg.fixed_input_size:
            kwargs["img_size"] = image_size
        state, source = None, None
        if weights_path:
            state, source = read_weights_file(weights_path), f"model.encoder.weights_path={weights_path}"
        elif pretrained:
            path = weight_files.fetch(weights_file(name))
            state, source = read_weights_file(path, option=f"the cached timm weights {path}"), str(path)
        self.trunk = self._build(state, source, kwargs)
        info = self.trunk.feature_info
        self.out_channels = info.channels()[-1]
        self.stride = info.reduction()[-1]  # input pixels per grid cell
        self.data_config = resolve_data_config({}, model=self.trunk)
        self.fixed_size = kwargs.get("img_size") or (self.data_config["input_size"][-1]
                                                     if cfg is not None and cfg.fixed_input_size else None)
        stages = stages_of(self.trunk)
        last = len(stages)
        while last > 1 and isinstance(stages[last - 1], NORMS):  # a final norm trains with the stage before
            last -= 1
        set_trainable(self.trunk, stages[:last], finetune, finetune_last_k, tail=stages[last:])
        self.train()  # a frozen encoder starts (and stays) in eval mode

    def _build(self, state: dict | None, source: str | None, kwargs: dict) -> nn.Module:
        import timm

        features = dict(features_only=True, out_indices=(self.out_index,), **kwargs)
        try:
            if state is None:
                return timm.create_model(self.name, **features)
            # timm loads weights into a features_only model leniently (the classifier is dropped,
            # and with it strict key checking): a file of another model would load as a random
            # init without a word. So the classifier model loads them strictly first (with
            # timm's own conversion of the checkpoint), and hands its complete state over.
            base = timm.create_model(self.name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state),
                                     **kwargs)
            return timm.create_model(self.name, pretrained=True, **features,
                                     pretrained_cfg_overlay=dict(state_dict=base.state_dict()))
        except (RuntimeError, KeyError, ValueError) as e:
            if state is None:
                raise
            # a KeyError comes from timm's conversion of a checkpoint layout it does not recognise
            detail = (f"no tensor {e.args[0]!r} among its {len(state)} (first: {next(iter(state), None)!r})"
                      if isinstance(e, KeyError) else load_error(e))
            raise ImcapError(f"{source} does not hold weights for timm {self.name}: {detail}") from e
        except (IndexError, AssertionError) as e:
            levels = len(timm.create_model(self.name, features_only=True, **kwargs).feature_info)
            raise ImcapError(f"model.encoder.out_index={self.out_index} is out of range: timm {self.name} "
                             f"has {levels} feature stages (0..{levels - 1}, or -1 for the last)") from e

    def identity(self) -> str:
        return f"timm|{self.name}|out_index={self.out_index}"

    def image_transform(self, image_size: int) -> Callable:
        if self.fixed_size and image_size != self.fixed_size:
            raise ImcapError(f"timm {self.name} is built for {self.fixed_size}-pixel images but data.image_size="
                             f"{image_size}; set model.encoder.image_size={image_size} (the config does: "
                             "${data.image_size})")
        from timm.data import create_transform

        cfg = self.data_config
        return create_transform(
            input_size=(3, image_size, image_size), interpolation=cfg["interpolation"], mean=cfg["mean"],
            std=cfg["std"], crop_pct=cfg["crop_pct"] if self.crop else 1.0,
            crop_mode=cfg["crop_mode"] if self.crop else "squash")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.trunk(images)[-1]  # (B, C, H', W')
        grid = fmap.flatten(2).transpose(1, 2).contiguous()  # (B, N, C)
        return grid, grid.mean(dim=1)  # pooled: (B, C)
