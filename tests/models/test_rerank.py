"""Consensus reranking: the neighbour memory finds the nearest training images and scores
candidates by CIDEr-D against their captions; `choose` keeps the agreeing hypothesis."""

from __future__ import annotations

import pytest
import torch

from imcap.metrics.cider import cider_d_scores
from imcap.models.rerank import NeighbourMemory, choose, consensus

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
    assert choose(tokens, scores, pooled, memory, 2, 0.0, EOS).tolist() == [1, 1]
    # a heavy weight on the log-probability gives back beam search's own best
    assert choose(tokens, scores, pooled, memory, 2, 100.0, EOS).tolist() == [0, 0]


def test_a_hypothesis_the_search_never_filled_is_never_chosen(memory):
    tokens = torch.tensor([[[10, 11, 12, EOS], [20, 21, EOS, 0]]])
    scores = torch.tensor([[float("-inf"), -5.0]])
    assert choose(tokens, scores, torch.tensor([[1.0, 0.0]]), memory, 2, 0.02, EOS).tolist() == [1]


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
