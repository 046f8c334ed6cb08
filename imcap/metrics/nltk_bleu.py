"""BLEU-4 as image-captioning tutorials report it, for comparing with their numbers.

Tutorial code (e.g. the widely copied "PyTorch Tutorial to Image Captioning") scores with
`nltk.translate.bleu_score.corpus_bleu(references, hypotheses)` and NLTK's defaults: uniform
weights (0.25,) * 4, no smoothing, the reference length closest to each hypothesis (ties to
the shorter), and words as lists of lower-cased tokens without punctuation (the Karpathy
split's `tokens`). Here the words are the
PTB-tokenised captions the other metrics use, split on spaces: the same lower-cased,
punctuation-free tokens (NLTK's `word_tokenize` is not used: it needs the punkt data).

The number is not coco-caption's BLEU-4 (`test/BLEU-4`), so it has its own name,
`BLEU-4_nltk`: NLTK counts at least one n-gram per caption (a caption shorter than four words
lowers its BLEU-4; measured 0.470 against coco's 0.534 on a two-caption example), and with no
matching 4-gram at all it returns a vanishing value (1e-78) where coco-caption's smoothing
keeps a small one. On corpora without such captions the two agree to about 1e-10.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence


def nltk_bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """nltk's corpus BLEU-4 of whitespace-tokenised captions, with NLTK's defaults."""
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():  # nltk warns whenever some n-gram order has no match
        warnings.simplefilter("ignore", UserWarning)
        return float(corpus_bleu([[r.split() for r in refs] for refs in references],
                                 [c.split() for c in candidates]))
