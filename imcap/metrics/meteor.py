"""METEOR 1.5 as a metric: the official jar that ships inside pycocoevalcap, one persistent Java
process per metric object, started lazily (`imcap.metrics.java.MeteorScorer`). Without `java`
on PATH it is skipped with one logged note."""

from __future__ import annotations

from typing import Any

from imcap.metrics.corpus import CaptionCorpusMetric
from imcap.metrics.java import MeteorScorer

__all__ = ["Meteor", "MeteorScorer"]


class Meteor(CaptionCorpusMetric):
    """`compute()` returns {"METEOR": ...} on coco-caption's 0-1 scale (corpus METEOR over the
    distinct images), or {} where Java cannot run."""

    def __init__(self, tokenize: bool = True, max_memory: str = "2G", timeout: float = 300.0, **kwargs: Any) -> None:
        super().__init__(tokenize=tokenize, **kwargs)
        self.scorer = MeteorScorer(max_memory, timeout)

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float]:
        value = self.scorer.score(candidates, references)
        return {} if value is None else {"METEOR": value}
