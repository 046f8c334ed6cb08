"""nltk's BLEU-4 as tutorials report it: equal to nltk's own corpus_bleu on the same words,
distinct from (and named apart from) coco-caption's BLEU-4."""

from __future__ import annotations

import json

import pytest
from nltk.translate.bleu_score import corpus_bleu

from imcap.errors import ImcapError
from imcap.metrics import CaptionMetrics
from imcap.metrics.nltk_bleu import nltk_bleu4

CANDIDATES = ["A dog runs on the grass.", "a man riding a red bike", "Two people walk on a beach ."]
REFERENCES = [["A dog runs on grass.", "The dog is running on the green grass"],
              ["A man riding a red bike.", "A cyclist on a red bicycle."],
              ["Two people walking along the beach.", "A couple on the sand."]]
# the same captions as tutorial code holds them: lower-cased word lists without punctuation
TUTORIAL_HYPOTHESES = [["a", "dog", "runs", "on", "the", "grass"], ["a", "man", "riding", "a", "red", "bike"],
                       ["two", "people", "walk", "on", "a", "beach"]]
TUTORIAL_REFERENCES = [[["a", "dog", "runs", "on", "grass"], ["the", "dog", "is", "running", "on", "the", "green", "grass"]],
                       [["a", "man", "riding", "a", "red", "bike"], ["a", "cyclist", "on", "a", "red", "bicycle"]],
                       [["two", "people", "walking", "along", "the", "beach"], ["a", "couple", "on", "the", "sand"]]]


def scores(metrics, candidates=CANDIDATES, references=REFERENCES):
    metric = CaptionMetrics(metrics=metrics)
    metric.update([f"img{i}" for i in range(len(candidates))], candidates, references)
    return {k: float(v) for k, v in metric.compute().items()}


def test_equals_nltk_corpus_bleu_on_tutorial_tokens():
    expected = corpus_bleu(TUTORIAL_REFERENCES, TUTORIAL_HYPOTHESES)  # NLTK's defaults
    assert 0.3 < expected < 1
    assert scores(["BLEU_nltk"]) == {"BLEU-4_nltk": pytest.approx(expected, abs=1e-12)}


def test_named_apart_from_coco_bleu_and_differs_from_it():
    both = scores(["BLEU", "BLEU_nltk"])
    assert set(both) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "BLEU-4_nltk"}
    assert scores(["BLEU"]) == {k: v for k, v in both.items() if k != "BLEU-4_nltk"}  # coco's keys unchanged
    # NLTK counts at least one 4-gram per caption, also for a two-word one: a lower BLEU-4
    short = scores(["BLEU", "BLEU_nltk"], ["a dog on the grass today", "a man"],
                   [["a dog on the grass", "dogs"], ["a man on a red bike"]])
    expected = corpus_bleu([[["a", "dog", "on", "the", "grass"], ["dogs"]], [["a", "man", "on", "a", "red", "bike"]]],
                           [["a", "dog", "on", "the", "grass", "today"], ["a", "man"]])
    assert short["BLEU-4_nltk"] == pytest.approx(expected, abs=1e-12)
    assert short["BLEU-4_nltk"] < short["BLEU-4"] - 0.05
    # no 4-gram in common: NLTK's unsmoothed BLEU-4 vanishes, coco-caption's smoothing keeps some
    none_shared = scores(["BLEU", "BLEU_nltk"], ["a dog on grass"], [["the grass has a dog on it"]])
    assert none_shared["BLEU-4_nltk"] < 1e-50 < 1e-6 < none_shared["BLEU-4"]


def test_function_takes_whitespace_tokens():
    assert nltk_bleu4(["a man riding a red bike"], [["a man riding a red bike"]]) == pytest.approx(1.0)


def test_unknown_metric_names_the_extra_option():
    with pytest.raises(ImcapError, match="BLEU_nltk"):
        CaptionMetrics(metrics=["BLEU-nltk"])


@pytest.mark.slow
def test_selected_in_test_metrics_a_training_run_reports_it(trained_run):
    """model.test_metrics=[BLEU,BLEU_nltk,...]: metrics.json gains test/BLEU-4_nltk, equal to
    nltk's corpus_bleu over the run's own test predictions and references."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from imcap.metrics.tokenizer import tokenize

    metrics = json.loads((trained_run / "metrics.json").read_text())
    predictions = json.loads((trained_run / "predictions" / "test.json").read_text())
    source = instantiate(OmegaConf.load(trained_run / "config.yaml").data.source)
    references = {str(r.image_id): r.captions for r in source.records() if r.split == "test"}
    assert len(predictions) == len(references) > 0
    expected = corpus_bleu([[tokenize(c).split() for c in references[str(p["image_id"])]] for p in predictions],
                           [tokenize(p["caption"]).split() for p in predictions])
    assert metrics["test/BLEU-4_nltk"] == pytest.approx(expected, abs=1e-9)
    assert "test/BLEU-4" in metrics and "val/BLEU-4_nltk" not in metrics  # val keeps its own list
