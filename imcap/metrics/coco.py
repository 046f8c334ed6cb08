"""The caption metrics in-process: what pycocoevalcap's `COCOEvalCap` reports, and any other
registered metric, from one metric object that accumulates over batches and synchronises across
DDP ranks.

Each metric is one class registered as `@register("metric", name)` (a `CorpusScore`); its name is
what `model.val_metrics`, `model.test_metrics`, `imcap.eval`'s `metrics` and `imcap.score
--metrics` accept. Captions are PTB-tokenised in Python at `update` (imcap.metrics.tokenizer, equal
to coco-caption's Java tokenizer), stored once, and every selected metric is computed from that
one deduplicated set at `compute`. METEOR and SPICE need Java (SPICE also CoreNLP 3.6.0); where
they cannot run their keys are left out after one logged note.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imcap import registry
from imcap.errors import ImcapError
from imcap.metrics.bleu import corpus_bleu
from imcap.metrics.cider import cider_d
from imcap.metrics.corpus import CaptionCorpusMetric, CorpusScore
from imcap.metrics.java import MeteorScorer, SpiceScorer
from imcap.metrics.nltk_bleu import nltk_bleu4
from imcap.metrics.rouge import rouge_l

# Registered in the order their keys are reported (the registry keeps registration order).


@registry.register("metric", "BLEU")
class BleuScore(CorpusScore):
    """coco-caption's corpus BLEU-1..4."""

    coco_caption = True
    keys = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float | None]:
        return dict(zip(self.keys, corpus_bleu(candidates, references)))


@registry.register("metric", "METEOR")
class MeteorScore(CorpusScore):
    """METEOR 1.5 from the jar in pycocoevalcap; `scorer` may be one whose Java process was
    started earlier (imcap.score starts it while torch loads)."""

    coco_caption = True
    keys = ("METEOR",)

    def __init__(self, max_memory: str = "2G", scorer: MeteorScorer | None = None) -> None:
        self.scorer = scorer or MeteorScorer(max_memory)

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float | None]:
        return {"METEOR": self.scorer.score(candidates, references)}


@registry.register("metric", "ROUGE-L")
class RougeLScore(CorpusScore):
    coco_caption = True
    keys = ("ROUGE-L",)

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float | None]:
        return {"ROUGE-L": rouge_l(candidates, references)}


@registry.register("metric", "CIDEr-D")
class CiderDScore(CorpusScore):
    coco_caption = True
    keys = ("CIDEr-D",)

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float | None]:
        return {"CIDEr-D": cider_d(candidates, references)}


@registry.register("metric", "SPICE")
class SpiceScore(CorpusScore):
    """SPICE from the jar in pycocoevalcap, which also needs Stanford CoreNLP 3.6.0."""

    coco_caption = True
    keys = ("SPICE",)

    def __init__(self, max_memory: str = "8G") -> None:
        self.scorer = SpiceScorer(max_memory)

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float | None]:
        return {"SPICE": self.scorer.score(candidates, references)}


@registry.register("metric", "BLEU_nltk")
class BleuNltkScore(CorpusScore):
    """Not coco-caption's: nltk's corpus BLEU-4 as tutorial code reports it (imcap.metrics.nltk_bleu)."""

    keys = ("BLEU-4_nltk",)

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float | None]:
        return {"BLEU-4_nltk": nltk_bleu4(candidates, references)}


def metric_names() -> list[str]:
    """Every registered metric's name, in the order their keys are reported."""
    return list(registry.components("metric"))


def coco_caption_names() -> list[str]:
    """The registered metrics of coco-caption's COCOEvalCap."""
    return [name for name, cls in registry.components("metric").items() if cls.coco_caption]


def metric_keys() -> list[str]:
    """Every key a registered metric reports (BLEU-1 .. BLEU-4, METEOR, ...)."""
    return [key for cls in registry.components("metric").values() for key in cls.keys]


def chosen_metrics(metrics: Sequence[str] | str | None) -> tuple[str, ...]:
    """The registered metrics that `metrics` names (None: coco-caption's), in registration order;
    an unknown name is one line listing the choices."""
    metrics = coco_caption_names() if metrics is None else [metrics] if isinstance(metrics, str) else list(metrics)
    known = registry.components("metric")
    unknown = [m for m in metrics if m not in known]
    if unknown or not metrics:
        raise ImcapError(f"metrics={metrics}: choose one or more of {', '.join(known)}")
    return tuple(m for m in known if m in metrics)


class CaptionMetrics(CaptionCorpusMetric):
    """`update(image_ids, candidates, references)`; `compute()` returns the keys of the chosen
    registered `metrics` ("BLEU" gives BLEU-1..4, "BLEU_nltk" gives BLEU-4_nltk, nltk's corpus
    BLEU-4 as tutorials report it), coco-caption's on its scales, in registration order; by
    default coco-caption's own (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE). A
    repeated image id (DDP padding) counts once. `meteor` may be a scorer whose Java process was
    started earlier; `meteor_memory` / `spice_memory` are the Java heaps of METEOR and SPICE.
    """

    def __init__(self, metrics: Sequence[str] | None = None, tokenize: bool = True,
                 meteor_memory: str = "2G", spice_memory: str = "8G",
                 meteor: MeteorScorer | None = None, **kwargs: Any) -> None:
        super().__init__(tokenize=tokenize, **kwargs)
        options = {"METEOR": {"max_memory": meteor_memory, "scorer": meteor}, "SPICE": {"max_memory": spice_memory}}
        self.metrics = chosen_metrics(metrics)
        known = registry.components("metric")
        self.scorers = {m: known[m](**options.get(m, {})) for m in self.metrics}

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float]:
        scores: dict[str, float | None] = {}
        for scorer in self.scorers.values():
            scores.update(scorer.score(candidates, references))
        return {k: v for k, v in scores.items() if v is not None}
