"""CaptionCorpusMetric, the base of every caption metric: what `score` receives after `update`
(PTB-tokenised unless told not to, one entry per distinct image, first seen kept) and what it
refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imcap.metrics.corpus import CaptionCorpusMetric


class Recorder(CaptionCorpusMetric):
    """Scores the number of images and keeps what it was given."""

    def score(self, candidates, references):
        self.given = (candidates, references)
        return {"images": len(candidates)}


def test_score_sees_each_image_once_in_first_seen_order_tokenised():
    metric = Recorder()
    metric.update(["b", "a"], ["A Dog, running!", "Two cats."], [["A dog runs."], ["Cats."]])
    metric.update(["a", "c"], ["ignored: a repeat", "Café au lait"], [["x"], ["Un café."]])
    assert metric.compute() == {"images": torch.tensor(3, dtype=torch.float64)}
    assert metric.corpus().image_ids == ["b", "a", "c"]
    candidates, references = metric.given
    assert candidates == ["a dog running", "two cats", "café au lait"]
    assert references == [["a dog runs"], ["cats"], ["un café"]]


def test_tokenize_false_keeps_the_text_and_ids_become_plain_ints():
    metric = Recorder(tokenize=False)
    metric.update(torch.tensor([3, 7]), ["A Dog!", "b"], [["X."], ["y"]])
    metric.update([np.int64(9)], ["c"], [["z"]])
    corpus = metric.corpus()
    assert corpus.image_ids == [3, 7, 9] and all(type(i) is int for i in corpus.image_ids)
    assert corpus.candidates == ["A Dog!", "b", "c"] and corpus.references == [["X."], ["y"], ["z"]]


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # compute before any update, on purpose
def test_nothing_added_gives_no_scores():
    assert Recorder().compute() == {}


@pytest.mark.parametrize("ids,candidates,references,message", [
    (["a", "b"], ["x"], [["y"]], "2 image ids, 1 candidates and 1 reference lists"),
    (["a"], ["x"], [[]], "non-empty list of reference strings"),
    (["a"], ["x"], ["a bare string"], "non-empty list of reference strings"),
    (["a"], [None], [["y"]], "expected a caption string"),
    ([1.5], ["x"], [["y"]], "image ids must be ints or strings"),
    ([True], ["x"], [["y"]], "image ids must be ints or strings"),
])
def test_malformed_updates_are_refused(ids, candidates, references, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Recorder().update(ids, candidates, references)
