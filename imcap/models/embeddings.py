"""Word embeddings for the decoder input."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from imcap.data.vocab import Vocabulary


class LearnedEmbedding(nn.Embedding):
    """A trainable embedding table; `<pad>` maps to a zero vector."""

    def __init__(self, vocab: Sequence[str], dim: int = 512):
        super().__init__(len(vocab), dim, padding_idx=Vocabulary.pad_id)
        self.dim = dim
