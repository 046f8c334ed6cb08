"""The captioner as a plain nn.Module: encoder + decoder + vocabulary, usable without Lightning.

    from imcap.models.captioner import Captioner
    captioner = Captioner.from_checkpoint("logs/train/runs/.../checkpoints/best.ckpt")
    for caption in captioner.caption(["photo.jpg"]):
        print(caption.text)
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from imcap.config_checks import check_stored_config, check_stored_values
from imcap.data.images import as_viewed, load_image
from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.models.decoder import require_attention
from imcap.models.ensemble import DecoderEnsemble, decoder_members, ensemble_size
from imcap.models.hub import CONFIG, VOCAB, WEIGHTS, read_folder, save_pretrained
from imcap.models.rerank import NeighbourMemory
from imcap.models.search import Decoding, SearchResult, generate
from imcap.plugins import load_plugins

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "imcap"  # where a checkpoint keeps what rebuilds the model: config + vocab
MEMORY_KEY_PREFIX = "memory."  # a Captioner's neighbour memory in its weights (imcap.models.rerank)
COMPONENTS = ("encoder", "decoder", "attention", "embedding")  # an architecture also holds `ensemble` (absent: 1)
# _target_s that moved: checkpoints written before the move name the old path
MOVED_TARGETS = {"imcap.models.decoders.LSTMDecoder": "imcap.models.lstm.LSTMDecoder",
                 "imcap.data.sources.flickr.Flickr8kSource": "imcap.data.sources.flickr8k.Flickr8kSource"}


class Caption(NamedTuple):
    text: str
    words: list[str]
    attention: torch.Tensor | None  # (len(words), N) weights per word, None without attention


def _plain(cfg: Mapping | DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg))


def _class(target: str | None) -> type | None:
    try:
        return get_class(target) if target else None
    except Exception:  # a bad _target_: instantiate reports it in its own words
        return None


def check_pair(decoder_cfg: Mapping, attention_cfg: Mapping | None) -> None:
    """Refuse a decoder x attention pair that has no meaning, listing the valid pairs."""
    decoder = _class(decoder_cfg.get("_target_"))
    target = (attention_cfg or {}).get("_target_")
    attention = _class(target) if target else None
    if not hasattr(decoder, "attention_support") or (target and attention is None):
        return  # a decoder that states no needs, or an unloadable attention: instantiate reports it
    require_attention(decoder, attention)


def build_captioner(
    architecture: Mapping | DictConfig, vocab: Vocabulary, image_size: int, pretrained: bool = True
) -> Captioner:
    """Instantiate encoder, embedding, attention and decoder from their config groups, after
    checking that the decoder x attention pair is valid.

    `pretrained=False` skips loading encoder weights and reading word-vector files (used when a
    checkpoint supplies them). A composed `model` config may be passed whole: its `decoding` is
    then how the captioner decodes, as the CLI's would (without one: `Decoding()`, the YAML's).
    """
    arch = _plain(architecture)
    decoding = Decoding(**arch["decoding"]) if arch.get("decoding") is not None else None
    arch = {k: arch[k] for k in (*COMPONENTS, "ensemble") if k in arch}  # what checkpoints store
    missing = [c for c in COMPONENTS if c not in arch]
    if missing:
        raise ImcapError(f"model config lacks {missing}; compose it from conf/model/ (model/encoder=...)")
    check_pair(arch["decoder"], arch.get("attention"))
    encoder_cfg = dict(arch["encoder"])
    # the options that name pretrained weights: torchvision's `weights`, timm's `pretrained`, ...
    encoder_class = _class(encoder_cfg.get("_target_"))
    weight_options = getattr(encoder_class, "WEIGHT_OPTIONS", ("weights", "weights_path"))
    params = inspect.signature(encoder_class).parameters if encoder_class is not None else {}
    if encoder_class is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        weight_options = tuple(o for o in weight_options if o in params)  # one's own may name no weights
    if not pretrained and "load_weights" in params:
        # named but not read: the weights' input normalisation (and open_clip's activation) are
        # part of the trained model; clearing the name rebuilt a model that saw other inputs
        encoder_cfg["load_weights"] = False
    elif not pretrained:
        encoder_cfg.update(dict.fromkeys(weight_options))
    elif weight_options and not any(encoder_cfg.get(option) for option in weight_options):
        log.warning("The encoder starts from random weights (model.encoder.%s=null)", weight_options[0])
    encoder = instantiate(encoder_cfg)
    decoder = build_decoder(arch, vocab, encoder.out_channels, pretrained)
    return Captioner(encoder, decoder, vocab, image_size, arch, decoding)


def build_decoder(arch: dict, vocab: Vocabulary, feature_dim: int, pretrained: bool = True) -> nn.Module:
    """Embedding, attention and decoder of `arch` for grid features of `feature_dim` channels;
    with `arch["ensemble"]` = K > 1, K of them, each freshly initialised, as one
    `DecoderEnsemble`.

    Records the word-vector dimension in `arch` so that a checkpoint rebuilds without the file.
    """
    k = ensemble_size(arch.get("ensemble", 1))
    members = [build_one_decoder(arch, vocab, feature_dim, pretrained) for _ in range(k)]
    return members[0] if k == 1 else DecoderEnsemble(members)


def build_one_decoder(arch: dict, vocab: Vocabulary, feature_dim: int, pretrained: bool = True) -> nn.Module:
    """One decoder of `arch` with its embedding and attention."""
    check_pair(arch["decoder"], arch.get("attention"))
    embedding_cfg = dict(arch["embedding"])
    if not pretrained and getattr(_class(embedding_cfg.get("_target_")), "reads_vectors", False):
        embedding_cfg["pretrained"] = False  # the checkpoint holds the table; no need for the file
    embedding = instantiate(embedding_cfg, vocab=vocab.itos)
    if getattr(embedding, "vector_dim", None):
        arch["embedding"]["vector_dim"] = embedding.vector_dim
    attention_cfg = arch.get("attention") or {}
    attention = instantiate(attention_cfg, _partial_=True) if attention_cfg.get("_target_") else None
    return instantiate(arch["decoder"], vocab_size=len(vocab), feature_dim=feature_dim,
                       embedding=embedding, attention=attention)


class Captioner(nn.Module):
    """Encoder -> grid features -> decoder; `caption()` goes from image files to sentences."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        vocab: Vocabulary,
        image_size: int,
        architecture: dict | None = None,
        decoding: Decoding | None = None,
    ):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.vocab, self.image_size = vocab, image_size
        self.architecture = architecture or {}
        # how caption() decodes: by default as the CLI does (conf/model/captioner.yaml); checkpoints
        # store the trained setting
        self.decoding = decoding or Decoding()
        # the training images' features and captions that consensus reranking votes with
        # (imcap.models.rerank); in the weights when set, so checkpoints and exports carry it
        self.memory: NeighbourMemory | None = None

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(images)  # (B, N, C), (B, C)

    def forward(self, grid: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor,
                lengths: torch.Tensor | None = None):
        """Teacher-forced logits (B, T, V) and attention (B, T, N) for input tokens (B, T);
        lengths (B,): positions per row that carry a target (no compute spent on the rest)."""
        return self.decoder(grid, pooled, tokens, lengths)

    def generate(self, grid: torch.Tensor, pooled: torch.Tensor, decoding: Decoding | None = None) -> SearchResult:
        """Captions for grid features (B, N, C) with greedy decoding or beam search."""
        return generate(self.decoder, grid, pooled, self.vocab, decoding or self.decoding, self.memory)

    def to_captions(self, result: SearchResult) -> list[Caption]:
        captions = []
        for b, ids in enumerate(result.tokens.tolist()):
            words = self.vocab.decode(ids)
            attn = result.attention[b, : len(words)].cpu() if result.attention is not None else None
            captions.append(Caption(" ".join(words), words, attn))
        return captions

    @torch.no_grad()
    def caption(
        self, images: Sequence[str | Path | Image.Image], decoding: Decoding | None = None, batch_size: int = 32
    ) -> list[Caption]:
        """Caption image files (or PIL images); `decoding` defaults to the checkpoint's."""
        was_training = self.training
        self.eval()
        transform = self.encoder.image_transform(self.image_size)
        device = next(self.parameters()).device
        out: list[Caption] = []
        for start in range(0, len(images), batch_size):
            chunk = [as_viewed(im) if isinstance(im, Image.Image) else load_image(str(im))  # upright, RGB
                     for im in images[start : start + batch_size]]
            pixels = torch.stack([transform(im) for im in chunk]).to(device)
            out.extend(self.to_captions(self.generate(*self.encode(pixels), decoding)))
        self.train(was_training)
        return out

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu",
                        plugins: Sequence[str] = ()) -> Captioner:
        """A captioner from a training checkpoint; `plugins`: modules of one's own that register
        components the checkpoint names (imcap.plugins), imported first."""
        load_plugins(plugins)
        checkpoint = load_checkpoint(path, map_location)
        meta = checkpoint[CHECKPOINT_KEY]
        captioner = build_captioner(meta["architecture"], Vocabulary(meta["vocab"]),
                                    meta["image_size"], pretrained=False)
        load_state(captioner, weights_under(checkpoint, "captioner."), path)
        captioner.decoding = Decoding.from_stored(meta.get("decoding"))
        return captioner.eval()

    def save_pretrained(self, folder: str | Path, data: dict | None = None,
                        metrics: dict[str, float] | None = None) -> Path:
        """Write weights (safetensors), config.json, vocab.json and a model card to `folder`:
        shareable without pickle (huggingface_hub's ModelHubMixin layout)."""
        return save_pretrained(self, folder, data, metrics)

    @classmethod
    def from_pretrained(cls, source: str | Path, map_location: str = "cpu", revision: str | None = None,
                        plugins: Sequence[str] = ()) -> Captioner:
        """A captioner from a folder written by `save_pretrained`, or a Hugging Face Hub repo id;
        `plugins` as for `from_checkpoint`."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        load_plugins(plugins)
        folder, config = read_folder(source, revision)
        captioner = build_captioner(config["architecture"], Vocabulary.load(folder / VOCAB),
                                    int(config.get("image_size", 224)), pretrained=False)
        try:
            with safe_open(str(folder / WEIGHTS), framework="pt") as weights:  # the memory alone, to size it
                attach_memory_for(captioner, {k: weights.get_tensor(k) for k in weights.keys()
                                              if k.startswith(MEMORY_KEY_PREFIX)})
            load_model(captioner, str(folder / WEIGHTS), strict=True, device=str(map_location))
        except Exception as e:  # wrong keys or shapes, a damaged file
            raise ImcapError(f"{folder / WEIGHTS} does not fit model config {folder / CONFIG} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); export the model again") from e
        captioner.decoding = Decoding.from_stored(config.get("decoding"))
        return captioner.eval()

    @classmethod
    def load(cls, source: str | Path | Sequence[str | Path], map_location: str = "cpu",
             plugins: Sequence[str] = (), revision: str | None = None) -> Captioner:
        """From a training checkpoint (a file), or a pretrained folder or Hub repo id (at
        `revision`: a commit or tag); from a list of training checkpoints, their ensemble
        (`join_ensemble`); `plugins` as for `from_checkpoint`."""
        load_plugins(plugins)
        if not isinstance(source, (str, Path)):
            first, *others = checkpoint_list(source)
            return join_ensemble(cls.from_checkpoint(first, map_location), others, first, map_location)
        if Path(source).is_file() or Path(source).suffix == ".ckpt":
            return cls.from_checkpoint(source, map_location)
        return cls.from_pretrained(source, str(map_location), revision)


def checkpoint_list(value: Any) -> list[str]:
    """`ckpt_path` as given (one path, or a list for an ensemble) -> a list of paths."""
    if isinstance(value, (str, Path)):
        return [str(value)]
    paths = [str(v) for v in value]
    if not paths:
        raise ImcapError("ckpt_path=[] names no checkpoint; pass one, or a list of checkpoints to ensemble")
    return paths


def join_ensemble(captioner: Captioner, paths: Sequence[str | Path], first: str | Path,
                  map_location: str | torch.device = "cpu") -> Captioner:
    """Make `captioner` (built from checkpoint `first`) decode as one ensemble with the decoders
    of the checkpoints at `paths`: separately trained models, e.g. other seeds, whose word
    probabilities are averaged at every step. They must share its vocabulary (the same training
    captions and data.min_freq) and its image features (encoder and image size)."""
    members = decoder_members(captioner.decoder)
    for path in paths:
        checkpoint = load_checkpoint(path, map_location)
        meta = checkpoint[CHECKPOINT_KEY]
        if list(meta["vocab"]) != list(captioner.vocab.itos):
            raise ImcapError(f"checkpoint {path} has another vocabulary than {first}; an ensemble averages word "
                             "probabilities, so its models must be trained on the same captions (data, split and "
                             "data.min_freq)")
        if meta["architecture"].get("encoder") != captioner.architecture.get("encoder") \
                or meta["image_size"] != captioner.image_size:
            raise ImcapError(f"checkpoint {path} encodes images differently from {first} (encoder or image size); "
                             "an ensemble decodes one set of image features: use checkpoints of the same encoder")
        decoder = build_decoder(copy.deepcopy(meta["architecture"]), captioner.vocab, captioner.encoder.out_channels,
                                pretrained=False)
        load_state(decoder, weights_under(checkpoint, "captioner.decoder."), path)
        members += decoder_members(decoder)
    captioner.decoder = DecoderEnsemble(members).to(next(captioner.parameters()).device).eval()
    return captioner


def weights_under(checkpoint: Mapping[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's weights of the module at `prefix` ("captioner.", "captioner.decoder."),
    keyed as that module names them."""
    return {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def checkpoint_file(path: str | Path) -> Path:
    """`path` if it is a file, or a one-line error saying what to pass."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
            raise ImcapError(f"ckpt_path={path} is a folder written by imcap.export, which captions (imcap.caption, the "
                             "demo, Captioner.load) but holds no training state; pass the training checkpoint it "
                             "was exported from, e.g. ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt")
        inside = next((c for c in (path / "checkpoints" / "best.ckpt", path / "best.ckpt") if c.is_file()), None)
        hint = f"e.g. ckpt_path={inside}" if inside else "ckpt_path=.../checkpoints/best.ckpt"
        raise ImcapError(f"ckpt_path={path} is a folder, not a checkpoint file; pass the file, {hint}")
    if not path.is_file():
        raise ImcapError(f"checkpoint not found: {path}; pass ckpt_path=.../checkpoints/best.ckpt")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint, or a one-line error saying why it cannot be used."""
    path = checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, wrong file type
        raise ImcapError(f"checkpoint {path} is corrupt or not a torch checkpoint ({type(e).__name__}); "
                         "use another checkpoint, e.g. checkpoints/last.ckpt") from e
    if (not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(CHECKPOINT_KEY), dict)
            or "state_dict" not in checkpoint):
        raise ImcapError(f"checkpoint {path} was not written by imcap training (no model config or vocabulary)")
    meta = checkpoint[CHECKPOINT_KEY]
    source = meta["data"].get("source") if isinstance(meta.get("data"), dict) else None
    for component in [*(meta.get("architecture") or {}).values(), source]:
        if isinstance(component, dict) and component.get("_target_") in MOVED_TARGETS:
            component["_target_"] = MOVED_TARGETS[component["_target_"]]  # written before the move
    # before anything is imported or built from it: the stored config names components, not code
    check_stored_config(checkpoint[CHECKPOINT_KEY], f"checkpoint {path}")
    check_stored_values(checkpoint[CHECKPOINT_KEY], f"checkpoint {path}")  # its format and decoding
    meta["decoding"] = Decoding.from_stored(meta.get("decoding")).to_config()  # keys it predates filled in
    return checkpoint


def attach_memory_for(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give each `Captioner` in `model` whose weights in `state` hold a neighbour memory an empty
    memory of that size (its size is the training set's), so that a strict load fills it."""
    for name, module in model.named_modules():
        if isinstance(module, Captioner):
            prefix = f"{name}.{MEMORY_KEY_PREFIX}" if name else MEMORY_KEY_PREFIX
            buffers = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            module.memory = NeighbourMemory.empty(buffers) if buffers else None


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Strict load with a one-line error when the architecture differs from the checkpoint."""
    for name, module in model.named_modules():  # a module that knows an earlier layout of its weights says so
        if hasattr(module, "check_weights"):
            module.check_weights(state, f"{name}." if name else "", f"checkpoint {path}")
    attach_memory_for(model, state)
    for name, module in model.named_modules():  # an encoder that renamed its modules reads the old names
        if hasattr(module, "rename_old_keys"):
            state = module.rename_old_keys(state, f"{name}." if name else "")
    missing, unexpected = [], []
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", mismatched))
            if keys
        )
        raise ImcapError(f"checkpoint {path} does not match the model architecture ({detail}); "
                         "use the model config the checkpoint was trained with")
    model.load_state_dict(state)
