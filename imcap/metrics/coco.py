"""The official COCO caption metrics in-process: what pycocoevalcap's `COCOEvalCap` reports, from
one metric object that accumulates over batches and synchronises across DDP ranks.

Captions are PTB-tokenised in Python at `update` (imcap.metrics.tokenizer, equal to coco-caption's
Java tokenizer), stored once, and every selected metric is computed from that one deduplicated
set at `compute`. METEOR and SPICE need Java (SPICE also CoreNLP 3.6.0); where they cannot run
their keys are left out after one logged note.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imcap.errors import ImcapError
from imcap.metrics.bleu import corpus_bleu
from imcap.metrics.cider import cider_d
from imcap.metrics.corpus import CaptionCorpusMetric
from imcap.metrics.java import MeteorScorer, SpiceScorer
from imcap.metrics.nltk_bleu import nltk_bleu4
from imcap.metrics.rouge import rouge_l

METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
# not coco-caption's: nltk's corpus BLEU-4 as tutorial code reports it (imcap.metrics.nltk_bleu)
EXTRAS = ("BLEU_nltk",)
KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE", "BLEU-4_nltk")


class CaptionMetrics(CaptionCorpusMetric):
    """`update(image_ids, candidates, references)`; `compute()` returns
    {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"} for the chosen `metrics`
    ("BLEU" gives the four BLEU keys), on coco-caption's scales; "BLEU_nltk" adds
    "BLEU-4_nltk", nltk's corpus BLEU-4 as tutorials report it. A repeated image id (DDP
    padding) counts once. `meteor` may be a scorer whose Java process was started earlier.
    """

    def __init__(self, metrics: Sequence[str] = METRICS, tokenize: bool = True,
                 meteor_memory: str = "2G", spice_memory: str = "8G",
                 meteor: MeteorScorer | None = None, **kwargs: Any) -> None:
        super().__init__(tokenize=tokenize, **kwargs)
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        unknown = [m for m in metrics if m not in METRICS + EXTRAS]
        if unknown or not metrics:
            raise ImcapError(f"metrics={metrics}: choose one or more of {', '.join(METRICS + EXTRAS)}")
        self.metrics = tuple(m for m in METRICS + EXTRAS if m in metrics)
        self.meteor = (meteor or MeteorScorer(meteor_memory)) if "METEOR" in self.metrics else None
        self.spice = SpiceScorer(spice_memory) if "SPICE" in self.metrics else None

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float]:
        scores: dict[str, float | None] = {}
        if "BLEU" in self.metrics:
            scores.update({f"BLEU-{k + 1}": s for k, s in enumerate(corpus_bleu(candidates, references))})
        if self.meteor is not None:
            scores["METEOR"] = self.meteor.score(candidates, references)
        if "ROUGE-L" in self.metrics:
            scores["ROUGE-L"] = rouge_l(candidates, references)
        if "CIDEr-D" in self.metrics:
            scores["CIDEr-D"] = cider_d(candidates, references)
        if self.spice is not None:
            scores["SPICE"] = self.spice.score(candidates, references)
        if "BLEU_nltk" in self.metrics:
            scores["BLEU-4_nltk"] = nltk_bleu4(candidates, references)
        return {k: v for k, v in scores.items() if v is not None}
