import logging

import pytest

from imcap.metrics import CaptionMetrics, Spice, java

CAPTION, REFERENCES = "A dog runs on the grass.", ["A dog runs on grass.", "The dog is running."]


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(java, "_noted", set())


def test_without_corenlp_spice_is_skipped_with_exactly_one_note(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(java, "spice_dir", lambda: tmp_path)  # a SPICE folder without CoreNLP
    spice, both = Spice(), CaptionMetrics(metrics=["BLEU", "SPICE"])
    for metric in (spice, both):
        metric.update(["a"], [CAPTION], [REFERENCES])
    with caplog.at_level(logging.WARNING, logger="imcap.metrics"):
        assert spice.compute() == {}
        assert list(both.compute()) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
        assert "SPICE" not in both.compute()
    notes = [r.getMessage() for r in caplog.records if "SPICE" in r.getMessage()]
    assert len(notes) == 1 and "CoreNLP 3.6.0" in notes[0] and str(tmp_path) in notes[0]


def test_without_java_spice_is_skipped(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    metric = Spice()
    metric.update(["a"], [CAPTION], [REFERENCES])
    with caplog.at_level(logging.WARNING, logger="imcap.metrics"):
        assert metric.compute() == {}
    assert [r.getMessage() for r in caplog.records] == ["SPICE skipped: `java` is not on PATH"]
