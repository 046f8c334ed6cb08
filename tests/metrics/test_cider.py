import pytest
from pycocoevalcap.cider.cider import Cider

from imcap.metrics import CiderD
from imcap.metrics.cider import cider_d, cider_d_scores
from imcap.metrics.tokenizer import tokenize
from tests.helpers.coco_reference import as_coco, flickr_sample, make_candidates, requires_flickr

# tokenised (candidates, references); CIDEr's idf needs several images to be non-zero
EDGE_CASES = [
    ["a dog runs on the grass", "dog", "", "the the the the the", "a man riding a red bike",
     "two people walk on a beach", "a man riding a red bike"],
    [["a dog runs on grass", "the dog is running"], ["a dog runs", "dog"], ["a dog runs"],
     ["the cat sat on the mat", "a cat"], ["a man rides a red bike down the street", "a cyclist"],
     ["two people walking along the beach", "a couple on the sand", "people on a beach"],
     ["a man riding a red bike"]],
]


def coco_cider(candidates, references):
    score, scores = Cider().compute_score(*as_coco(candidates, references))
    return score, list(scores)


def test_matches_coco_caption_on_edge_cases():
    candidates, references = EDGE_CASES
    score, per_image = coco_cider(candidates, references)
    assert cider_d_scores(candidates, references) == pytest.approx(per_image, abs=1e-12)
    assert cider_d(candidates, references) == pytest.approx(score, abs=1e-12)
    assert per_image[2] == 0  # the empty candidate
    assert per_image[-1] > per_image[4] > 0  # an exact reference beats a near one


def test_one_image_scores_zero_as_in_coco_caption():
    # idf is log(#images / df) = log(1 / 1): every weight is 0
    assert cider_d(["a dog runs"], [["a dog runs"]]) == coco_cider(["a dog runs"], [["a dog runs"]])[0] == 0


@requires_flickr
@pytest.mark.realdata
def test_matches_coco_caption_on_real_captions():
    _, raw = flickr_sample(400)
    candidates = make_candidates(raw)
    expected, _ = coco_cider([tokenize(c) for c in candidates], [[tokenize(r) for r in refs[1:]] for refs in raw])
    metric = CiderD()
    half = len(raw) // 2
    metric.update(range(half), candidates[:half], [refs[1:] for refs in raw[:half]])
    metric.update(range(half, len(raw)), candidates[half:], [refs[1:] for refs in raw[half:]])
    assert float(metric.compute()["CIDEr-D"]) == pytest.approx(expected, abs=1e-4)
    assert 0.3 < expected < 3  # a plausible corpus, on coco-caption's x10 scale


def test_fixed_document_frequencies_equal_the_corpus_own_when_it_is_the_same_corpus():
    from imcap.metrics.cider import cider_d_scores, document_frequencies

    refs = [["a red circle", "one red circle"], ["a blue square left of a red circle", "two shapes"],
            ["a green triangle", "a small green triangle"]]
    cands = ["a red circle", "a blue square", "a green circle"]
    assert cider_d_scores(cands, refs, frequencies=document_frequencies(refs)) == cider_d_scores(cands, refs)
    wider = document_frequencies(refs + [["a red circle"]] * 5)  # "red circle" now common: worth less
    assert cider_d_scores(cands, refs, frequencies=wider)[0] < cider_d_scores(cands, refs)[0]
