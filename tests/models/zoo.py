"""Tiny instances of every decoder x attention pair, shared by the model-zoo tests."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from imcap.models import attention as att
from imcap.models.captioner import valid_pairs
from imcap.models.decoders import LSTMDecoder
from imcap.models.embeddings import LearnedEmbedding
from imcap.models.topdown import TopDownDecoder
from imcap.models.transformer import TransformerDecoder

V, C, N, B, T, H = 30, 24, 9, 3, 7, 32

ATTENTIONS = {
    "none": None,
    "additive": partial(att.AdditiveAttention, attention_dim=20),
    "dot": partial(att.DotAttention),
    "general": partial(att.GeneralAttention),
    "scaled_dot": partial(att.ScaledDotAttention, attention_dim=20),
    "multihead": partial(att.MultiHeadAttention, attention_dim=16, heads=4),
    "adaptive": partial(att.AdaptiveAttention, attention_dim=20),
}
DECODERS = {
    "lstm": partial(LSTMDecoder, dropout=0.3),
    "topdown": partial(TopDownDecoder, dropout=0.3),
    "transformer": partial(TransformerDecoder, layers=2, heads=4, dropout=0.1),
}
PAIRS = valid_pairs()
INVALID = [(d, a) for d in DECODERS for a in ATTENTIONS if (d, a) not in PAIRS]


def pair_id(pair: tuple[str, str]) -> str:
    return "-".join(pair)


def make_decoder(decoder: str, attention: str, seed: int = 0, hidden: int = H, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    emb = LearnedEmbedding([str(i) for i in range(V)], dim=16)
    return DECODERS[decoder](V, C, emb, ATTENTIONS[attention], hidden_dim=hidden, **kwargs).eval()


def inputs(seed: int = 1, batch: int = B, length: int = T) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(batch, N, C, generator=g)
    return grid, grid.mean(1), torch.randint(0, V, (batch, length), generator=g)
