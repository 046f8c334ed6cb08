"""Word embeddings for the decoder input: learned from scratch, or pretrained word vectors."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from imcap.data.vocab import Vocabulary
from imcap.data.wordvectors import load_word_vectors
from imcap.registry import register

log = logging.getLogger(__name__)


@register("embedding", "learned")
class LearnedEmbedding(nn.Embedding):
    """A trainable embedding table; `<pad>` maps to a zero vector."""

    def __init__(self, vocab: Sequence[str], dim: int):  # dim: the decoder's width in the YAML
        super().__init__(len(vocab), dim, padding_idx=Vocabulary.pad_id)
        self.dim = dim


@register("embedding", "glove")
class GloveEmbedding(nn.Module):
    """Pretrained word vectors (GloVe or word2vec text, or the packaged GloVe 6B-50d).

    path: a text file, or None for the packaged GloVe 6B-50d.
    dim: the width the decoder receives; when it differs from the vectors' width a learned
        linear projection maps them there (None: the vectors' own width, no projection).
    freeze: keep the table fixed (the projection, if any, still trains).
    Words the file lacks (and the special tokens) start from random vectors with the found
    vectors' scale; `<pad>` is zero. `found` (V,) bool marks the words the file had; it is a
    buffer, so it travels with checkpoints.
    vector_dim / pretrained=False: a checkpoint supplies the table, so the file is not read
    (build_captioner records vector_dim after the first build).
    """

    reads_vectors = True

    def __init__(
        self,
        vocab: Sequence[str],
        path: str | None = None,
        dim: int | None = None,
        freeze: bool = True,
        vector_dim: int | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        wv = None
        if pretrained or vector_dim is None:
            wv = load_word_vectors(path, vocab)
            vector_dim = wv.dim
            log.info("Word vectors %s: %d/%d vocabulary words found (coverage %.1f%%), %d-d",
                     wv.source, int(wv.found.sum()), len(vocab), 100 * wv.coverage, wv.dim)
            if not wv.found.any():
                log.warning("No vocabulary word is in %s: the embedding is random", wv.source)
        self.vector_dim = vector_dim
        self.dim = dim or vector_dim
        self.table = nn.Embedding(len(vocab), vector_dim, padding_idx=Vocabulary.pad_id)
        self.register_buffer("found", torch.zeros(len(vocab), dtype=torch.bool))
        if wv is not None:
            self._fill(torch.from_numpy(wv.vectors), torch.from_numpy(wv.found))
        self.table.weight.requires_grad_(not freeze)
        self.proj = nn.Linear(vector_dim, self.dim, bias=False) if self.dim != vector_dim else None

    @torch.no_grad()
    def _fill(self, vectors: torch.Tensor, found: torch.Tensor) -> None:
        # vectors (V, D), found (V,): unfound rows random with the scale of the found ones
        std = float(vectors[found].std()) if int(found.sum()) > 1 else self.vector_dim**-0.5
        weight = torch.randn_like(vectors) * std
        weight[found] = vectors[found]
        weight[Vocabulary.pad_id] = 0.0
        self.table.weight.copy_(weight)
        self.found.copy_(found)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.table(tokens)  # (..., vector_dim)
        return self.proj(x) if self.proj is not None else x  # (..., dim)
