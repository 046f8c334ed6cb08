import inspect
import logging
from pathlib import Path

import pytest
from pycocoevalcap.meteor.meteor import Meteor as CocoMeteor

from imcap.metrics import CaptionMetrics, Meteor, java
from imcap.metrics.java import MeteorScorer
from imcap.metrics.tokenizer import tokenize
from tests.helpers.coco_reference import (
    as_coco,
    coco_meteor,
    flickr_sample,
    make_candidates,
    requires_flickr,
    requires_java,
)

# tokenised candidates and references, with the edge cases METEOR's wrapper has to survive
CANDIDATES = ["a dog runs on the grass", "dog", "", "the the the the the", "a man riding a red bike",
              "two people walk on a beach", "ein café am fluss", "a | b ||| c"]
REFERENCES = [["a dog runs on grass", "the dog is running"], ["a dog runs", "dog"], ["a dog runs"],
              ["the cat sat on the mat", "a cat"], ["a man rides a red bike down the street", "a cyclist"],
              ["two people walking along the beach", "a couple on the sand"], ["ein café am fluss"],
              ["a b c"]]


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(java, "_noted", set())


@pytest.fixture(scope="module")
def meteors():
    """pycocoevalcap's Meteor and ours, on one Java process: it takes seconds to load the
    paraphrase table, and the jar answers each request on its own, so what differs between the
    two is only what is sent and how the answers are read. (The CLI test starts its own.)"""
    coco = coco_meteor()
    ours = MeteorScorer()
    ours._proc = coco.meteor_p
    yield coco, ours
    ours._proc = None  # not ours to stop


@requires_java
def test_runs_the_jar_as_pycocoevalcap_does(meteors):
    coco, ours = meteors
    command, folder = ours.command()
    assert command[1:] == coco.meteor_cmd[1:] and command[0].endswith("java")
    assert folder == Path(inspect.getfile(CocoMeteor)).parent


def our_meteor(scorer, candidates, references, batch=50):
    metric = Meteor(tokenize=False)
    metric.scorer = scorer
    for start in range(0, len(candidates), batch):
        end = start + batch
        metric.update(range(start, min(end, len(candidates))), candidates[start:end], references[start:end])
    metric.update([0, 1], candidates[:2], references[:2])  # repeated images count once
    return float(metric.compute()["METEOR"])


@requires_java
def test_matches_pycocoevalcap_meteor_on_edge_cases(meteors):
    coco, ours = meteors
    expected = coco.compute_score(*as_coco(CANDIDATES, REFERENCES))[0]
    assert our_meteor(ours, CANDIDATES, REFERENCES, batch=3) == pytest.approx(expected, abs=1e-4)
    assert 0 < expected < 1


@requires_java
def test_caption_metrics_reports_the_same_meteor(meteors):
    coco, ours = meteors
    metric = CaptionMetrics(metrics=["BLEU", "METEOR"], tokenize=False, meteor=ours)
    metric.update(range(len(CANDIDATES)), CANDIDATES, REFERENCES)
    expected = coco.compute_score(*as_coco(CANDIDATES, REFERENCES))[0]
    assert float(metric.compute()["METEOR"]) == pytest.approx(expected, abs=1e-4)


@requires_java
@requires_flickr
@pytest.mark.realdata
def test_matches_pycocoevalcap_meteor_on_real_captions(meteors):
    coco, ours = meteors
    _, raw = flickr_sample(300)
    candidates = [tokenize(c) for c in make_candidates(raw)]
    references = [[tokenize(r) for r in refs[1:]] for refs in raw]
    expected = coco.compute_score(*as_coco(candidates, references))[0]
    assert our_meteor(ours, candidates, references) == pytest.approx(expected, abs=1e-4)


def test_without_java_it_is_skipped_with_exactly_one_note(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `java` here
    metric = Meteor()
    metric.update(["a"], ["A dog."], [["A dog runs."]])
    with caplog.at_level(logging.WARNING, logger="imcap.metrics"):
        assert metric.compute() == {}
        metric.update(["b"], ["A cat."], [["A cat sits."]])
        assert metric.compute() == {}
        assert MeteorScorer().score(["a"], [["a"]]) is None
    notes = [r for r in caplog.records if "METEOR" in r.getMessage()]
    assert len(notes) == 1 and "java" in notes[0].getMessage()
