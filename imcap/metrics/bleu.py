"""Corpus BLEU-1..4 exactly as coco-caption computes it (pycocoevalcap `Bleu`, option
`closest`): clipped n-gram matches summed over the corpus, the reference length closest to each
candidate's (ties to the shorter), the same tiny/small smoothing constants.

The state is a handful of sums, so it synchronises across DDP ranks by addition.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torchmetrics import Metric

TINY, SMALL = 1e-15, 1e-9  # coco-caption's constants


def ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def sentence_stats(candidate: str, references: Sequence[str], n: int = 4) -> tuple[list[int], list[int], int, int]:
    """(correct[k], guess[k], candidate length, closest reference length) for one image."""
    words = candidate.split()
    max_ref: Counter = Counter()
    ref_lens = []
    for ref in references:
        ref_words = ref.split()
        ref_lens.append(len(ref_words))
        max_ref |= ngrams(ref_words, n)  # element-wise max over references
    counts = ngrams(words, n)
    correct = [0] * n
    for gram, count in counts.items():
        correct[len(gram) - 1] += min(count, max_ref[gram])
    guess = [max(0, len(words) - k) for k in range(n)]
    closest = min((abs(length - len(words)), length) for length in ref_lens)[1]
    return correct, guess, len(words), closest


def bleu_from_stats(correct: Sequence[float], guess: Sequence[float], testlen: float, reflen: float) -> list[float]:
    scores, product = [], 1.0
    for k in range(len(correct)):
        product *= (float(correct[k]) + TINY) / (float(guess[k]) + SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + TINY) / (reflen + SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """BLEU-1..n of a whole evaluated set of whitespace-tokenised captions."""
    correct, guess, testlen, reflen = [0] * n, [0] * n, 0, 0
    for candidate, refs in zip(candidates, references):
        c, g, t, r = sentence_stats(candidate, refs, n)
        correct = [a + b for a, b in zip(correct, c)]
        guess = [a + b for a, b in zip(guess, g)]
        testlen, reflen = testlen + t, reflen + r
    return bleu_from_stats(correct, guess, testlen, reflen)


class CorpusBLEU(Metric):
    """`update(candidates, references)` with whitespace-tokenised strings; `compute()` returns
    {"BLEU-1": ..., "BLEU-4": ...} on coco-caption's 0-1 scale."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, n: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.n = n
        self.add_state("correct", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("guess", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("testlen", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("reflen", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        for candidate, refs in zip(candidates, references):
            if not refs:
                raise ValueError("every candidate needs at least one reference")
            correct, guess, testlen, reflen = sentence_stats(candidate, refs, self.n)
            self.correct += torch.tensor(correct, dtype=torch.float64, device=self.correct.device)
            self.guess += torch.tensor(guess, dtype=torch.float64, device=self.guess.device)
            self.testlen += testlen
            self.reflen += reflen

    def compute(self) -> dict[str, torch.Tensor]:
        scores = bleu_from_stats(self.correct.tolist(), self.guess.tolist(),
                                 float(self.testlen), float(self.reflen))
        return {f"BLEU-{k + 1}": torch.tensor(s, dtype=torch.float64) for k, s in enumerate(scores)}
