"""ROUGE-L exactly as coco-caption computes it (pycocoevalcap `Rouge`): per image, the longest
common subsequence with each reference, precision and recall each maximised over the references
separately, combined as an F-measure with beta = 1.2, then averaged over images.

Like coco-caption, captions are split on single spaces, so an empty caption is one empty token.
"""

from __future__ import annotations

from collections.abc import Sequence

from imcap.metrics.corpus import CaptionCorpusMetric

BETA = 1.2  # coco-caption's value (after a discussion with Hovy)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel over `b` (Crochemore et al. 2001):
    one big-integer addition per token of `a` instead of a len(a) x len(b) table."""
    masks: dict[str, int] = {}
    for i, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full  # a zero bit marks a column where the LCS grew
    for token in a:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def rouge_l_sentence(candidate: str, references: Sequence[str], beta: float = BETA) -> float:
    """One image's ROUGE-L: best precision and best recall over the references (each may come
    from a different reference, as in coco-caption), combined as F_beta."""
    cand = candidate.split(" ")
    precision = recall = 0.0
    for ref in references:
        ref_tokens = ref.split(" ")
        lcs = lcs_length(ref_tokens, cand)
        precision = max(precision, lcs / len(cand))
        recall = max(recall, lcs / len(ref_tokens))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L over images (tokenised captions, one candidate and >= 1 reference each)."""
    scores = [rouge_l_sentence(c, refs) for c, refs in zip(candidates, references)]
    return sum(scores) / len(scores)


class RougeL(CaptionCorpusMetric):
    """`compute()` returns {"ROUGE-L": mean over distinct images} on coco-caption's 0-1 scale."""

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float]:
        return {"ROUGE-L": rouge_l(candidates, references)}
