"""SPICE as a metric, optional: the jar inside pycocoevalcap also needs Stanford CoreNLP 3.6.0,
which is not downloaded here. Where it (or `java`) is missing, SPICE is skipped with one logged
note (`imcap.metrics.java.SpiceScorer`)."""

from __future__ import annotations

from typing import Any

from imcap.metrics.corpus import CaptionCorpusMetric
from imcap.metrics.java import SpiceScorer

__all__ = ["Spice", "SpiceScorer"]


class Spice(CaptionCorpusMetric):
    """`compute()` returns {"SPICE": ...} on a 0-1 scale, or {} where SPICE cannot run."""

    def __init__(self, tokenize: bool = True, max_memory: str = "8G", **kwargs: Any) -> None:
        super().__init__(tokenize=tokenize, **kwargs)
        self.scorer = SpiceScorer(max_memory)

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float]:
        value = self.scorer.score(candidates, references)
        return {} if value is None else {"SPICE": value}
