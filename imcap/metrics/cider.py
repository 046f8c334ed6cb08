"""CIDEr-D exactly as coco-caption computes it (pycocoevalcap `Cider`, which is the -D variant):
tf-idf vectors of 1..4-grams with document frequencies counted over the references of the
evaluated set itself, candidate weights clipped at the reference's, a Gaussian penalty
(sigma = 6) on the length difference, averaged over n and over references, times 10.

Two coco-caption details kept on purpose: the "length" in the penalty is the number of bigrams
(len - 1), and idf uses log(number of images), so one image alone scores 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from imcap.metrics.corpus import CaptionCorpusMetric

NGRAMS, SIGMA, SCALE = 4, 6.0, 10.0


def ngram_counts(sentence: str, n: int = NGRAMS) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class TfIdf(NamedTuple):
    """A caption's CIDEr vector: per n-gram order {ngram: tf * idf}, the norms, the bigram count."""

    vectors: list[dict]
    norms: list[float]
    length: int


def tfidf(counts: Counter, df: Counter, log_images: float, n: int = NGRAMS) -> TfIdf:
    """The tf-idf vector of one caption's n-gram `counts` under document frequencies `df`."""
    vec: list[dict] = [{} for _ in range(n)]
    norm = [0.0] * n
    for gram, tf in counts.items():
        k = len(gram) - 1
        weight = float(tf) * (log_images - math.log(max(1.0, df[gram])))
        vec[k][gram] = weight
        norm[k] += weight**2
    return TfIdf(vec, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2))


def similarity(candidate: TfIdf, reference: TfIdf, sigma: float = SIGMA) -> float:
    """CIDEr-D of a candidate against one reference, before the x10 scale: the clipped cosine
    per n-gram order, averaged over orders, times the Gaussian length penalty."""
    penalty = math.e ** (-(float(candidate.length - reference.length) ** 2) / (2 * sigma**2))
    total = 0.0
    for vec, vec_r, norm, norm_r in zip(candidate.vectors, reference.vectors, candidate.norms, reference.norms):
        val = sum(min(w, vec_r.get(g, 0.0)) * vec_r.get(g, 0.0) for g, w in vec.items())
        if norm != 0 and norm_r != 0:
            val /= norm * norm_r
        total += val * penalty
    return total / len(candidate.vectors)


def document_frequencies(references: Sequence[Sequence[str]], n: int = NGRAMS) -> tuple[Counter, float]:
    """In how many images' references each n-gram occurs, and log(number of images)."""
    df: Counter = Counter()
    for refs in references:
        df.update(set().union(*(ngram_counts(r, n) for r in refs)))
    return df, math.log(float(len(references)))


def cider_d_scores(candidates: Sequence[str], references: Sequence[Sequence[str]],
                   n: int = NGRAMS, sigma: float = SIGMA,
                   frequencies: tuple[Counter, float] | None = None) -> list[float]:
    """CIDEr-D of each image (tokenised captions), on coco-caption's scale (x10).

    Document frequencies come from `references` themselves, as coco-caption does, unless
    `frequencies` (from `document_frequencies` of a fixed corpus, e.g. the training captions
    for SCST rewards) is given.
    """
    ref_counts = [[ngram_counts(r, n) for r in refs] for refs in references]
    if frequencies is None:
        df: Counter = Counter()  # in how many images' references each n-gram occurs
        for counts in ref_counts:
            df.update(set().union(*counts))
        log_images = math.log(float(len(references)))
    else:
        df, log_images = frequencies
    scores = []
    for candidate, refs in zip(candidates, ref_counts):
        vec = tfidf(ngram_counts(candidate, n), df, log_images, n)
        total = sum(similarity(vec, tfidf(ref, df, log_images, n), sigma) for ref in refs)
        scores.append(total / len(refs) * SCALE)
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    scores = cider_d_scores(candidates, references)
    return sum(scores) / len(scores)


class CiderD(CaptionCorpusMetric):
    """`compute()` returns {"CIDEr-D": ...} as coco-caption reports CIDEr (e.g. 1.05), with
    document frequencies from the references of all distinct images gathered from all ranks."""

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float]:
        return {"CIDEr-D": cider_d(candidates, references)}
