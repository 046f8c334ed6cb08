import random

import pytest
from pycocoevalcap.rouge.rouge import Rouge, my_lcs

from imcap.metrics import RougeL
from imcap.metrics.rouge import lcs_length, rouge_l
from imcap.metrics.tokenizer import tokenize
from tests.helpers.coco_reference import as_coco, flickr_sample, make_candidates, requires_flickr

# (candidates, references), already tokenised as coco-caption tokenises
EDGE_CASES = [
    (["a dog runs on the grass"], [["a dog runs on grass", "the dog is running"]]),
    (["dog"], [["a dog runs", "dog"]]),  # one word, equal to a reference
    ([""], [["a dog runs"]]),  # empty candidate: one empty token, no overlap
    ([""], [[""]]),  # empty against empty: coco-caption calls that a perfect match
    (["the the the the the"], [["the cat sat on the mat", "a cat"]]),  # repeated words
    (["a b c d", "x"], [["d c b a", "a c"], ["y z"]]),  # best precision and recall from different refs
    (["ein café am fluss"], [["ein café am fluss mit zwei bällen"]]),
]


def coco_rouge(candidates, references):
    return Rouge().compute_score(*as_coco(candidates, references))[0]


def test_lcs_equals_coco_caption_dynamic_programming():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 15))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 15))]
        assert lcs_length(a, b) == lcs_length(b, a) == my_lcs(a, b)


@pytest.mark.parametrize("candidates,references", EDGE_CASES)
def test_matches_coco_caption_on_edge_cases(candidates, references):
    assert rouge_l(candidates, references) == pytest.approx(coco_rouge(candidates, references), abs=1e-12)


@requires_flickr
@pytest.mark.realdata
def test_matches_coco_caption_on_real_captions():
    _, raw = flickr_sample(400)
    raw_candidates = make_candidates(raw)
    references = [[tokenize(r) for r in refs[1:]] for refs in raw]
    candidates = [tokenize(c) for c in raw_candidates]
    metric = RougeL()  # the metric tokenises raw captions itself
    metric.update(list(range(len(raw))), raw_candidates, [refs[1:] for refs in raw])
    expected = coco_rouge(candidates, references)
    assert float(metric.compute()["ROUGE-L"]) == pytest.approx(expected, abs=1e-4)
    assert rouge_l(candidates, references) == pytest.approx(expected, abs=1e-12)


def test_batches_accumulate_and_repeated_images_count_once():
    cands = [c for cs, _ in EDGE_CASES for c in cs]
    refs = [r for _, rs in EDGE_CASES for r in rs]
    metric = RougeL(tokenize=False)
    metric.update(range(4), cands[:4], refs[:4])
    metric.update([3, 4, 5, 6, 7, 0], cands[3:] + cands[:1], refs[3:] + refs[:1])  # 3 and 0 again
    assert float(metric.compute()["ROUGE-L"]) == pytest.approx(coco_rouge(cands, refs), abs=1e-12)
