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

from imcap.metrics.corpus import CaptionCorpusMetric

NGRAMS, SIGMA, SCALE = 4, 6.0, 10.0


def ngram_counts(sentence: str, n: int = NGRAMS) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _tfidf(counts: Counter, df: Counter, log_images: float, n: int) -> tuple[list[dict], list[float], int]:
    """Per n-gram order: {ngram: tf * idf}, the vector's norm, and the bigram count."""
    vec: list[dict] = [{} for _ in range(n)]
    norm = [0.0] * n
    for gram, tf in counts.items():
        k = len(gram) - 1
        weight = float(tf) * (log_images - math.log(max(1.0, df[gram])))
        vec[k][gram] = weight
        norm[k] += weight**2
    return vec, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2)


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
        vec, norm, length = _tfidf(ngram_counts(candidate, n), df, log_images, n)
        total = [0.0] * n
        for ref in refs:
            vec_r, norm_r, length_r = _tfidf(ref, df, log_images, n)
            penalty = math.e ** (-(float(length - length_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * SCALE)
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    scores = cider_d_scores(candidates, references)
    return sum(scores) / len(scores)


class CiderD(CaptionCorpusMetric):
    """`compute()` returns {"CIDEr-D": ...} as coco-caption reports CIDEr (e.g. 1.05), with
    document frequencies from the references of all distinct images gathered from all ranks."""

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float]:
        return {"CIDEr-D": cider_d(candidates, references)}
