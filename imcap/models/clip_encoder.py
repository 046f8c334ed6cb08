"""The visual tower of a CLIP / OpenCLIP model (open_clip) as a captioning encoder.

ViT towers: the grid is the patch tokens after block `block` (default the last), reshaped
(H', W') and flattened, through the tower's final LayerNorm; pooled is the class token there
(`pooled=class_token`, C = the tower's width), or the CLIP image embedding (`pooled=embedding`:
the grid tokens then go through the same final projection, so that C is the embedding size), or
the grid mean (`pooled=mean`). ResNet towers (RN50, ...): the grid is the last feature map,
pooled its mean (their attention pooling is not a grid). Other towers (timm-based, attention
pooled) are refused; timm's versions of them work through model/encoder=timm.

Preprocessing is open_clip's for the pretrained tag (mean, std, interpolation), applied to the
whole image resized to a square (`crop=true`: open_clip's own resize mode, a centre crop for
most tags). Only the visual tower is kept; the text tower is dropped after construction.
"""

from __future__ import annotations

import logging
import os
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

POOLED = ("class_token", "embedding", "mean")
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")
# open_clip is imported where it is used: importing it costs seconds, and every run imports this
# module (the registry does).


def weights_file(name: str, tag: str) -> weight_files.WeightsFile:
    """Where open_clip keeps the weights of (name, tag): a Hugging Face repository
    (open_clip_model.safetensors, else open_clip_pytorch_model.bin), else a URL cached in
    ~/.cache/clip."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    what = f"open_clip {name} pretrained={tag}"
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" or "org/repo/file.bin"
        if not filename:
            files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        elif filename.endswith((".bin", ".pth")):  # open_clip prefers a safetensors twin
            files = (("open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin"
                      else filename[:-4] + ".safetensors"), filename)
        else:
            files = (filename,)
        return weight_files.WeightsFile(what, repo_id, files)
    return weight_files.WeightsFile(what, url=cfg.get("url") or None, url_cache=Path("~/.cache/clip").expanduser())


def _visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The visual tower's entries of a whole CLIP state dict (`visual.*`), or a tower's own."""
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return dict(state)


@register("encoder", "open_clip")
class OpenClipEncoder(GridEncoder):
    """An open_clip visual tower.

    pretrained: an open_clip tag of `name` (`openai`, `laion2b_s34b_b79k`, ...; null: random
    init), found in the Hugging Face cache or downloaded when online. weights_path: a local
    safetensors or torch file with an open_clip state dict of this model (whole CLIP or its
    `visual` tower) instead; with a tag as well, the tag still sets QuickGELU and preprocessing.
    load_weights: False builds the tower for the tag (QuickGELU, preprocessing) without reading
    any weights: a checkpoint supplies them.
    image_size: what ViT towers are built for (position embeddings resampled); None keeps the
    model's. pooled: class_token | embedding | mean, or None for the tower's default
    (class_token for ViTs, mean for ResNets). finetune: `none` | `last_k` (the last
    `finetune_last_k` blocks or ResNet stages, and the final norm and projection) | `all`.
    output_stride: TorchvisionEncoder's cut, unused here, accepted so that a recipe may set it.
    """

    WEIGHT_OPTIONS = ("pretrained", "weights_path")

    def __init__(
        self,
        name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        weights_path: str | None = None,
        block: int = -1,
        pooled: str | None = None,
        finetune: str = "none",
        finetune_last_k: int = 1,
        image_size: int | None = None,
        crop: bool = False,
        output_stride: int | None = None,
        load_weights: bool = True,
    ):
        import open_clip
        from open_clip.transformer import VisionTransformer

        super().__init__(finetune)
        note_unused_output_stride(output_stride, f"open_clip {name}",
                                  "its grid is the tower's patch or last-stage grid")
        if name not in open_clip.list_models():
            raise ImcapError(f"model.encoder.name={name!r} is not an open_clip model; list them with "
                             "`python -c \"import open_clip; print(open_clip.list_models())\"`")
        if pooled is not None and pooled not in POOLED:
            raise ImcapError(f"model.encoder.pooled={pooled!r}; choose one of {POOLED}, or null for the "
                             "tower's default (class_token for ViTs, mean for ResNets)")
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
        if pretrained and not tag_cfg:
            raise ImcapError(f"model.encoder.pretrained={pretrained!r} is not an open_clip tag of {name}; choose "
                             f"one of {open_clip.list_pretrained_tags_by_model(name)}, or null for a random init")
        self.name, self.tag, self.crop = name, pretrained, crop
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip's "initialized randomly": the weights come below
        try:
            model = open_clip.create_model(
                name, pretrained=None, force_quick_gelu=bool(tag_cfg.get("quick_gelu")), force_image_size=image_size,
                force_preprocess_cfg={k: tag_cfg[k] for k in PREPROCESS_KEYS if k in tag_cfg}, pretrained_text=False)
        finally:
            logging.disable(previous)
        visual = model.visual
        del model  # the text tower
        self.preprocess = dict(visual.preprocess_cfg)
        self.is_vit = isinstance(visual, VisionTransformer)
        self.pooled = pooled = pooled or ("class_token" if self.is_vit else "mean")
        self._check_tower(visual, block, pooled)
        if not self.is_vit:
            del visual.attnpool  # pooled is the grid mean: the attention pool is not used
        state, source = None, None
        # load_weights=False: a checkpoint supplies the tensors; the tag has still set preprocessing and QuickGELU
        if weights_path and load_weights:
            state, source = read_weights_file(weights_path), f"model.encoder.weights_path={weights_path}"
        elif pretrained and load_weights:
            path = weight_files.fetch(weights_file(name, pretrained))
            state, source = read_weights_file(path, option=f"the cached open_clip weights {path}"), str(path)
        if state is not None:
            self._load(visual, _visual_state(state), source)
        self.trunk = visual
        self.image_size = tuple(visual.image_size) if self.is_vit else None  # ResNet towers take any size
        if self.is_vit:
            layers = len(visual.transformer.resblocks)
            if not -layers <= block < layers:
                raise ImcapError(f"model.encoder.block={block} is out of range: {name} has {layers} blocks "
                                 f"(0..{layers - 1}, or -1 for the last)")
            self.block = block % layers
            if pooled != "embedding":  # the blocks after the chosen one and the projection are unused
                visual.prune_intermediate_layers([self.block], prune_norm=False, prune_head=True)
            self.out_channels = visual.proj.shape[1] if pooled == "embedding" else visual.transformer.width
            stages = list(visual.transformer.resblocks)
            tail = [visual.ln_post] + ([visual.proj] if pooled == "embedding" else [])
        else:
            self.block = -1
            self.out_channels = visual.layer4[-1].conv3.out_channels  # 2048 for RN50
            stages, tail = [visual.layer1, visual.layer2, visual.layer3, visual.layer4], []
        self.pooled_is_grid_mean = pooled == "mean"
        set_trainable(self.trunk, stages, finetune, finetune_last_k, tail)
        self.train()  # a frozen encoder starts (and stays) in eval mode

    def _check_tower(self, visual: nn.Module, block: int, pooled: str) -> None:
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        if isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None:
                raise ImcapError(f"open_clip {self.name} pools with attention (no class token grid); "
                                 "use a ViT or ResNet CLIP tower, or its timm version with model/encoder=timm")
            return
        if not isinstance(visual, ModifiedResNet):
            raise ImcapError(f"open_clip {self.name}'s visual tower is a {type(visual).__name__}, not an open_clip "
                             "ViT or ResNet; use its timm version with model/encoder=timm")
        if pooled != "mean" or block != -1:
            raise ImcapError(f"open_clip {self.name} is a ResNet tower: its grid is the last feature map and "
                             "pooled its mean; set model.encoder.pooled=mean and model.encoder.block=-1")

    def _load(self, visual: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
        from open_clip.model import resize_pos_embed

        if self.is_vit:  # position embeddings of another image size are resampled, as open_clip does
            full = {f"visual.{k}": v for k, v in state.items()}
            resize_pos_embed(full, nn.ModuleDict({"visual": visual}))
            state = {k[len("visual."):]: v for k, v in full.items()}
        else:
            state = {k: v for k, v in state.items() if not k.startswith("attnpool.")}
        try:
            visual.load_state_dict(state)
        except RuntimeError as e:
            raise ImcapError(f"{source} does not hold weights for open_clip {self.name}: {load_error(e)}") from e

    def identity(self) -> str:
        return f"open_clip|{self.name}|block={self.block}|pooled={self.pooled}"

    def image_transform(self, image_size: int) -> Callable:
        if self.image_size is not None and (image_size, image_size) != self.image_size:
            raise ImcapError(f"open_clip {self.name} is built for {self.image_size[0]}-pixel images but "
                             f"data.image_size={image_size}; set model.encoder.image_size={image_size} "
                             "(the config does: ${data.image_size})")
        import open_clip

        p = self.preprocess
        return open_clip.image_transform(
            image_size, is_train=False, mean=p["mean"], std=p["std"], interpolation=p["interpolation"],
            resize_mode=p["resize_mode"] if self.crop else "squash", fill_color=p.get("fill_color", 0))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.trunk
        if not self.is_vit:
            x = visual.stem(images)
            for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                x = layer(x)
            grid = x.flatten(2).transpose(1, 2).contiguous()  # (B, N, C)
            return grid, grid.mean(dim=1)
        out = visual.forward_intermediates(
            images, indices=[self.block], stop_early=self.pooled != "embedding", normalize_intermediates=True,
            intermediates_only=self.pooled != "embedding", output_fmt="NLC", output_extra_tokens=True)
        grid = out["image_intermediates"][0]  # (B, N, width): patch tokens through the final LayerNorm
        if self.pooled == "embedding":
            return grid @ visual.proj, out["image_features"]  # (B, N, E), (B, E)
        if self.pooled == "class_token":
            return grid, out["image_intermediates_prefix"][0][:, 0]  # (B, width)
        return grid, grid.mean(dim=1)

