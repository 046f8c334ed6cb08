"""Consensus reranking: the neighbour memory finds the nearest training images and scores
candidates by CIDEr-D against their captions; `choose` keeps the agreeing hypothesis."""

from __future__ import annotations

import pytest
import torch

from imcap.metrics.cider import cider_d_scores, ngram_counts, tfidf
from imcap.models.rerank import (
    NeighbourMemory,
    candidate_vectors,
    consensus,
    consensus_scores,
    pick_by_consensus,
)

EOS = 2
# three training images: two of dogs (features near [1, 0]), one of a boat (near [0, 1])
POOLED = torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0]])
CAPTIONS = [[[10, 11, 12], [10, 11, 13]], [[10, 11, 12, 14]], [[20, 21], [20, 22], [20, 21, 22]]]


@pytest.fixture
def memory() -> NeighbourMemory:
    return NeighbourMemory.build(POOLED, CAPTIONS)


def test_nearest_images_are_found_by_the_cosine_of_pooled_features(memory):
    query = torch.tensor([[2.0, 0.1], [0.1, 3.0]])  # scale does not matter, direction does
    assert memory.nearest(query, 2).tolist() == [[0, 1], [2, 0]]
    assert memory.nearest(query, 10).shape == (2, 3)  # at most the memory's size


def test_consensus_is_cider_d_against_the_neighbours_captions_with_the_memorys_frequencies(memory):
    candidates = ["10 11 12", "20 21", "10 11 14"]
    references = ["10 11 12", "10 11 13", "10 11 12 14"]  # images 0 and 1
    expected = cider_d_scores(candidates, [references] * 3, frequencies=memory.frequencies())
    assert consensus(memory, candidates, [0, 1]) == pytest.approx(expected, abs=1e-12)
    assert memory.frequencies()[1] == pytest.approx(torch.log(torch.tensor(3.0)).item())


def test_choose_keeps_the_hypothesis_the_neighbours_agree_with(memory):
    # per image 3 hypotheses (B, K, L), the boat caption most probable for the dog photo
    tokens = torch.tensor([[[20, 21, EOS, 0], [10, 11, 12, EOS], [10, 20, EOS, 0]],
                           [[10, 11, EOS, 0], [20, 21, 22, EOS], [20, 21, EOS, 0]]])
    scores = torch.tensor([[-1.0, -3.0, -2.0], [-1.0, -2.0, -4.0]])
    pooled = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # a dog photo, a boat photo
    assert pick_by_consensus(tokens, scores, pooled, memory, 2, 0.0, EOS).tolist() == [1, 1]
    # a heavy weight on the log-probability gives back beam search's own best
    assert pick_by_consensus(tokens, scores, pooled, memory, 2, 100.0, EOS).tolist() == [0, 0]


def test_a_hypothesis_the_search_never_filled_is_never_chosen(memory):
    tokens = torch.tensor([[[10, 11, 12, EOS], [20, 21, EOS, 0]]])
    scores = torch.tensor([[float("-inf"), -5.0]])
    assert pick_by_consensus(tokens, scores, torch.tensor([[1.0, 0.0]]), memory, 2, 0.02, EOS).tolist() == [1]


def test_a_large_training_set_keeps_an_evenly_spaced_subset(caplog):
    caplog.set_level("INFO", logger="imcap.models.rerank")
    pooled = torch.randn(10, 4)
    captions = [[[i + 100]] for i in range(10)]
    memory = NeighbourMemory.build(pooled, captions, max_images=4)
    assert len(memory) == 4
    assert [memory._captions(i) for i in range(4)] == [["100"], ["103"], ["106"], ["109"]]
    assert torch.allclose(memory.features.float(), torch.nn.functional.normalize(pooled[[0, 3, 6, 9]]), atol=1e-3)
    assert "4 of 10 training images" in caplog.text


def test_a_loaded_memory_scores_with_its_own_captions_not_the_cached_ones(memory):
    consensus(memory, ["10 11"], [0])  # fills the caches
    other = NeighbourMemory.build(POOLED[[2, 1, 0]], CAPTIONS[::-1])
    loaded = NeighbourMemory.empty(memory.state_dict())
    loaded.load_state_dict(memory.state_dict())
    assert consensus(loaded, ["10 11"], [0]) == consensus(memory, ["10 11"], [0])
    memory.load_state_dict(other.state_dict())
    assert memory._captions(0) == ["20 21", "20 22", "20 21 22"]
    assert consensus(memory, ["10 11"], [0]) == consensus(other, ["10 11"], [0])


def test_a_loaded_memory_finds_neighbours_by_its_own_features(memory):
    query = torch.tensor([[1.0, 0.05]])
    assert memory.nearest(query, 1).tolist() == [[0]]  # keeps an fp32 copy of the features
    memory.load_state_dict(NeighbourMemory.build(POOLED[[2, 1, 0]], CAPTIONS[::-1]).state_dict())
    assert memory.nearest(query, 1).tolist() == [[2]]  # the same image, now in the last row


def plain_choose(tokens, scores, pooled, memory, neighbours, logprob_weight, eos_id) -> list[int]:
    """`choose` as it was before it scored with tensors: `consensus` per image, in Python."""
    near = memory.nearest(pooled, neighbours)
    picks = []
    for b, rows in enumerate(tokens.tolist()):
        texts = [" ".join(map(str, row[: row.index(eos_id)] if eos_id in row else row)) for row in rows]
        agreement = torch.tensor(consensus(memory, texts, near[b].tolist()), dtype=torch.float64)
        total = agreement + logprob_weight * scores[b].double()
        picks.append(int(total.argmax()) if torch.isfinite(total).any() else 0)
    return picks


def assert_tensor_scores_equal_the_plain_ones(memory, tokens, scores, pooled, neighbours):
    near = memory.nearest(pooled, neighbours)
    texts = [[" ".join(map(str, row[: row.index(EOS)] if EOS in row else row)) for row in rows]
             for rows in tokens.tolist()]
    fast = consensus_scores(memory, tokens, near, EOS)
    plain = torch.tensor([consensus(memory, row, near[b].tolist()) for b, row in enumerate(texts)],
                         dtype=torch.float64)
    assert fast.shape == plain.shape and fast.dtype == torch.float64
    assert torch.allclose(fast, plain, rtol=1e-12, atol=1e-12)  # the same sums, in another order
    assert pick_by_consensus(tokens, scores, pooled, memory, neighbours, 0.02, EOS).tolist() == \
        plain_choose(tokens, scores, pooled, memory, neighbours, 0.02, EOS)


def test_tensor_scores_equal_the_plain_ones_on_random_captions():
    g = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(4, 30, (n,), generator=g).tolist()  # noqa: E731 (a small vocabulary: shared n-grams)
    captions = [[words(int(torch.randint(1, 12, (1,), generator=g))) for _ in range(int(torch.randint(1, 6, (1,), generator=g)))]
                for _ in range(40)]
    memory = NeighbourMemory.build(torch.randn(40, 8, generator=g), captions)
    B, K, L = 6, 5, 14
    tokens = torch.randint(4, 30, (B, K, L), generator=g)
    tokens[:, :, -1] = EOS
    ends = torch.randint(0, L, (B, K), generator=g)  # <eos> anywhere, also first (an empty caption)
    tokens.scatter_(2, ends.unsqueeze(2), EOS)
    tokens[0, 1] = tokens[0, 0]  # a repeated hypothesis
    tokens[1, 2, :] = 99  # words no training caption has, and no <eos>
    scores = -torch.rand(B, K, generator=g) * 10
    scores[2, :] = float("-inf")  # an image with no filled hypothesis
    scores[3, 1:] = float("-inf")
    for neighbours in (1, 7, 40):
        assert_tensor_scores_equal_the_plain_ones(memory, tokens, scores, torch.randn(B, 8, generator=g), neighbours)


def test_candidate_vectors_are_the_plain_tfidf_vectors():
    """Each candidate's n-grams (those no memory caption has too, and repeated ones), with the
    same float64 weights as `tfidf` of its string, its norms and its length."""
    g = torch.Generator().manual_seed(2)
    captions = [[torch.randint(4, 12, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (3,), generator=g)]
                for _ in range(20)]
    memory = NeighbourMemory.build(torch.randn(20, 4, generator=g), captions)
    tokens = torch.randint(4, 14, (12, 10), generator=g)  # words 12 and 13: in no memory caption
    tokens[0] = torch.tensor([5, 6, 5, 6, 5, 6, 5, 6, EOS, 7])  # repeated n-grams, words after <eos>
    tokens[1, 0] = EOS  # no words
    tokens[2] = 13  # no <eos>: all ten words, none known
    table, (df, log_images) = memory.reference_table(), memory.frequencies()
    vectors = candidate_vectors(tokens, EOS, table, log_images)
    for r, row in enumerate(tokens.tolist()):
        plain = tfidf(ngram_counts(" ".join(map(str, row[: row.index(EOS)] if EOS in row else row))), df, log_images)
        want = sorted((k, weight, table.grams.get(gram, -1)) for k, entries in enumerate(plain.vectors)
                      for gram, weight in entries.items())
        mine = vectors.rows == r
        got = sorted(zip(vectors.orders[mine].tolist(), vectors.weights[mine].tolist(), vectors.grams[mine].tolist()))
        assert got == want  # the same n-grams with the same weights, to the bit
        assert vectors.norms[r].tolist() == pytest.approx(plain.norms, rel=1e-12, abs=0)
        assert int(vectors.lengths[r]) == plain.length


@pytest.mark.realdata
def test_tensor_scores_equal_the_plain_ones_on_real_captions():
    import csv

    from imcap.data.tokenizer import tokenize
    from tests.helpers.paths import FLICKR_1K

    by_image: dict[str, list[list[str]]] = {}
    with open(FLICKR_1K / "captions.txt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_image.setdefault(row["image"], []).append(tokenize(row["caption"]))
    ids: dict[str, int] = {}
    captions = [[[ids.setdefault(w, len(ids) + 4) for w in c] for c in caps] for caps in by_image.values()]
    g = torch.Generator().manual_seed(1)
    memory = NeighbourMemory.build(torch.randn(len(captions) - 100, 16, generator=g), captions[100:])
    # candidates: other images' real captions, 16 per image as the default decoding reranks
    B, K = 8, 16
    L = max(len(c) for caps in captions for c in caps) + 1
    tokens = torch.zeros(B, K, L, dtype=torch.long)
    for b in range(B):
        for k in range(K):
            words = captions[(b * K + k) // 5 % 100][(b * K + k) % len(captions[(b * K + k) // 5 % 100])]
            tokens[b, k, : len(words)] = torch.tensor(words)
            tokens[b, k, len(words)] = EOS
    scores = -torch.rand(B, K, generator=g) * 20
    assert_tensor_scores_equal_the_plain_ones(memory, tokens, scores, torch.randn(B, 16, generator=g), 50)
