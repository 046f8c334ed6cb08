"""coco-caption's Java scorers as imcap runs them: where a scorer cannot run it returns None and
says why exactly once; a copied scorer never shares a running process. (METEOR against
pycocoevalcap: tests/metrics/test_meteor.py; a misbehaving process: tests/faults/test_meteor.py.)"""

from __future__ import annotations

import copy
import logging
import pickle

import pytest

from imcap.metrics import java
from imcap.metrics.java import SPICE_CORENLP_JARS, MeteorScorer, SpiceScorer


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(java, "_noted", set())


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "imcap.metrics"]


def test_without_java_both_scorers_return_none_and_each_says_so_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `java` here
    with caplog.at_level(logging.WARNING, logger="imcap.metrics"):
        for _ in range(3):  # e.g. three validation epochs
            assert MeteorScorer().score(["a dog"], [["a dog runs"]]) is None
            assert SpiceScorer().score(["a dog"], [["a dog runs"]]) is None
    assert notes(caplog) == ["METEOR skipped: `java` is not on PATH (install a JRE to compute it)",
                             "SPICE skipped: `java` is not on PATH"]


def test_spice_without_corenlp_names_the_folder_and_jars_it_needs(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(java, "java_executable", lambda: "/usr/bin/java")
    monkeypatch.setattr(java, "spice_dir", lambda: tmp_path / "spice")
    with caplog.at_level(logging.WARNING, logger="imcap.metrics"):
        assert SpiceScorer().score(["a dog"], [["a dog runs"]]) is None
    (message,) = notes(caplog)
    assert str(tmp_path / "spice" / "lib") in message and all(jar in message for jar in SPICE_CORENLP_JARS)


def test_the_jars_are_found_in_the_installed_pycocoevalcap():
    folder = java.pycocoevalcap_dir()
    assert (folder / "meteor" / "meteor-1.5.jar").is_file() and java.spice_dir() == folder / "spice"
    command, cwd = MeteorScorer(max_memory="1G").command()
    assert cwd == folder / "meteor" and "-Xmx1G" in command and "meteor-1.5.jar" in command


def test_a_copied_or_pickled_scorer_does_not_share_the_java_process():
    scorer = MeteorScorer(max_memory="1G", timeout=7.0)
    scorer._proc = object()  # stands in for a running process
    for clone in (copy.deepcopy(scorer), pickle.loads(pickle.dumps(scorer))):
        assert clone._proc is None and clone.max_memory == "1G" and clone.timeout == 7.0
    scorer._proc = None
