"""Distinct-1 (Li et al., 2016): distinct words over all words of the generated captions.

A diversity measure that needs no references: a model that says the same few words of every
image scores low however well they match. One class; no YAML, because a metric is chosen by its
name in a list (`model.test_metrics=[BLEU,CIDEr-D,distinct-1]`) and has no options to configure.
"""

from __future__ import annotations

from imcap.metrics.corpus import CorpusScore
from imcap.registry import register


@register("metric", "distinct-1")
class Distinct1(CorpusScore):
    keys = ("distinct-1",)

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float | None]:
        words = [word for caption in candidates for word in caption.split()]  # PTB-tokenised already
        return {"distinct-1": len(set(words)) / len(words) if words else 0.0}
