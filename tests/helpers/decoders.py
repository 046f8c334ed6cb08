"""Tiny decoders for every registered decoder x attention pair, derived from the registry:
the one decoder factory of the test suite."""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import nn

from imcap import registry
from imcap.models.attention import NO_ATTENTION
from imcap.models.decoder import valid_pairs
from imcap.models.embeddings import LearnedEmbedding

V, C, N, B, T, H = 30, 24, 9, 3, 7, 32  # vocabulary, feature channels, grid cells, batch, steps, hidden
# small sizes for whichever of these options a component takes (None defaults stay None: dot's
# parameter-free score)
TINY_OPTIONS = {"attention_dim": 20, "heads": 4, "layers": 2}
MAX_DROPOUT = 0.3

ATTENTIONS = [NO_ATTENTION, *registry.names("attention")]
PAIRS = valid_pairs()
INVALID = [(d, a) for d in registry.names("decoder") for a in ATTENTIONS if (d, a) not in PAIRS]


def pair_id(pair: tuple[str, str]) -> str:
    return "-".join(pair)


def tiny_options(cls: type) -> dict:
    """TINY_OPTIONS that `cls` takes and does not default to None; dropout at most MAX_DROPOUT."""
    params = inspect.signature(cls.__init__).parameters
    options = {k: v for k, v in TINY_OPTIONS.items() if k in params and params[k].default is not None}
    if "dropout" in params:
        options["dropout"] = min(params["dropout"].default, MAX_DROPOUT)
    return options


def attention(name: str) -> partial | None:
    """The attention option `name` as a decoder takes it (a partial, as Hydra builds it)."""
    if name == NO_ATTENTION:
        return None
    cls = registry.get("attention", name)
    return partial(cls, **tiny_options(cls))


def make_decoder(decoder: str, attention_name: str, seed: int = 0, hidden: int = H, vocab: int = V,
                 channels: int = C, embedding_dim: int = 16, **options) -> nn.Module:
    """A tiny registered decoder with the attention option `attention_name`, in eval mode."""
    torch.manual_seed(seed)
    cls = registry.get("decoder", decoder)
    emb = LearnedEmbedding([str(i) for i in range(vocab)], dim=embedding_dim)
    return cls(vocab, channels, emb, attention(attention_name), hidden_dim=hidden,
               **{**tiny_options(cls), **options}).eval()


def inputs(seed: int = 1, batch: int = B, length: int = T) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grid (batch, N, C), pooled (batch, C), tokens (batch, length)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(batch, N, C, generator=g)
    return grid, grid.mean(1), torch.randint(0, V, (batch, length), generator=g)


def architecture(decoder: str, attention_name: str) -> dict:
    """A model config (what conf/model composes) for the pair, with a random-init ResNet-18."""
    att = attention(attention_name)
    att_cfg = {"_target_": None} if att is None else {"_target_": registry.target_of(att.func), **att.keywords}
    dec = registry.get("decoder", decoder)
    return {"encoder": {"_target_": registry.target_of(registry.get("encoder", "torchvision")),
                        "name": "resnet18", "weights": None},
            "decoder": {"_target_": registry.target_of(dec), "hidden_dim": H, **tiny_options(dec)},
            "attention": att_cfg,
            "embedding": {"_target_": registry.target_of(registry.get("embedding", "learned")), "dim": 16}}


def assert_steps_reproduce_teacher_forcing(dec: nn.Module) -> None:
    """`step` one token at a time gives the logits and weights of the teacher-forced forward."""
    grid, pooled, tokens = inputs()
    with torch.no_grad():
        logits, weights = dec(grid, pooled, tokens)
        state = dec.init_state(grid, pooled)
        for t in range(tokens.shape[1]):
            step_logits, state, step_weights = dec.step(state, tokens[:, t])
            torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-5, atol=1e-5)
            if weights is not None:
                torch.testing.assert_close(step_weights, weights[:, t], rtol=1e-5, atol=1e-6)
            else:
                assert step_weights is None
