import csv
import random
from collections import defaultdict

import pytest
from pycocoevalcap.bleu.bleu import Bleu

from imcap.data.tokenizer import normalize
from imcap.metrics import CorpusBLEU
from imcap.metrics.bleu import corpus_bleu
from tests.helpers.paths import SHARED_DATA


def coco_bleu(candidates, references):
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    return Bleu(4).compute_score(gts, res, verbose=0)[0]


def ours(candidates, references):
    metric = CorpusBLEU()
    metric.update(candidates, references)
    return [float(v) for v in metric.compute().values()]


EDGE_CASES = [
    (["a dog runs on the grass"], [["a dog runs on grass", "the dog is running"]]),
    (["dog"], [["a dog runs", "dog"]]),
    ([""], [["a dog runs"]]),
    (["the the the the the"], [["the cat sat on the mat", "a cat"]]),
    (["ein café am fluss mit zwei bälle"], [["ein café am fluss", "zwei bälle im café"]]),
    (["a man", "a woman rides a red bike down the street fast"], [["a man walks"], ["a woman rides a bike", "a red bike on a street"]]),
]


@pytest.mark.parametrize("candidates,references", EDGE_CASES)
def test_matches_coco_caption_on_edge_cases(candidates, references):
    assert ours(candidates, references) == pytest.approx(coco_bleu(candidates, references), abs=1e-9)
    assert corpus_bleu(candidates, references) == pytest.approx(coco_bleu(candidates, references), abs=1e-9)


@pytest.mark.realdata
def test_matches_coco_caption_on_real_flickr_captions():
    captions = defaultdict(list)
    with open(SHARED_DATA / "flickr8k-captions-all.txt", newline="") as f:
        for image, caption in list(csv.reader(f))[1:]:
            captions[image].append(normalize(caption))
    rng = random.Random(0)
    images = sorted(captions)[:400]
    # candidates: a held-out reference, a truncated one, or another image's caption
    candidates = []
    for image in images:
        pick = rng.random()
        own = captions[image][0].split()
        other = captions[rng.choice(images)][1].split()
        candidates.append(" ".join(own if pick < 0.5 else own[: rng.randint(1, 6)] if pick < 0.8 else other))
    references = [captions[image][1:] for image in images]
    assert ours(candidates, references) == pytest.approx(coco_bleu(candidates, references), abs=1e-6)


def test_accumulating_batches_equals_one_corpus_and_states_add_across_ranks():
    cands = [c for cs, _ in EDGE_CASES for c in cs]
    refs = [r for _, rs in EDGE_CASES for r in rs]
    whole = ours(cands, refs)
    batched = CorpusBLEU()
    batched.update(cands[:3], refs[:3])
    batched.update(cands[3:], refs[3:])
    assert [float(v) for v in batched.compute().values()] == pytest.approx(whole, abs=1e-12)
    # DDP reduces every state by summation: two "ranks" merged equal one process
    rank0, rank1 = CorpusBLEU(), CorpusBLEU()
    rank0.update(cands[:4], refs[:4])
    rank1.update(cands[4:], refs[4:])
    rank0.merge_state(rank1)
    assert [float(v) for v in rank0.compute().values()] == pytest.approx(whole, abs=1e-12)


def test_perfect_candidates_score_one():
    refs = [["a red circle left of a blue square"], ["three shapes a red circle a blue square and a green triangle"]]
    assert ours([r[0] for r in refs], refs) == pytest.approx([1.0] * 4, abs=1e-6)
