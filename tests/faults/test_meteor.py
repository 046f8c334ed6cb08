"""METEOR's Java process misbehaving, played by small Python scripts that speak its protocol:
one that never answers, one that dies, one that answers out of step. Each call ends within its
timeout, says what happened, and the next call talks to a fresh process, never to a pipe with
unread output."""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest

from imcap.metrics.java import MeteorScorer

# A METEOR stand-in: a SCORE line gets "<n> 1 2" (n = the number of references), EVAL gets one
# line per image and then the mean n as the corpus score. BEHAVIOUR picks a fault.
FAKE = textwrap.dedent("""
    import sys, time
    behaviour = sys.argv[1]
    scored = 0
    for line in sys.stdin:
        if behaviour == "hang":
            time.sleep(600)
        if line.startswith("SCORE"):
            scored += 1
            if behaviour == "die" and scored == 2:
                sys.exit(3)
            if behaviour == "garbage":
                print("Exception in thread main java.lang.OutOfMemoryError", flush=True)
                continue
            extra = "0 0 0\\n" if behaviour == "extra" and scored == 1 else ""  # every later answer one off
            print(f"{extra}{line.count('|||') - 1} 1 2", flush=True)
        elif line.startswith("EVAL"):
            # one write per request, as a JVM's buffered stdout sends it (also under PYTHONUNBUFFERED=1)
            counts = [float(s.split()[0]) for s in line.split(" ||| ")[1:]]
            print("\\n".join(map(str, [*counts, sum(counts) / len(counts)])), flush=True)
""")

CANDIDATES = ["a dog", "a cat", "two birds"]
REFERENCES = [["a dog runs"], ["a cat", "the cat"], ["birds", "two birds", "a bird"]]
EXPECTED = (1 + 2 + 3) / 3  # the stand-in's corpus score: the mean number of references


class Fake(MeteorScorer):
    """A scorer whose process is the stand-in with the behaviour of the moment."""

    def __init__(self, tmp_path, timeout: float = 60.0):
        super().__init__(timeout=timeout)
        self.script = tmp_path / "fake_meteor.py"
        self.script.write_text(FAKE, encoding="utf-8")
        self.behaviour, self.started = "ok", []

    def available(self) -> bool:
        return True

    def command(self):
        self.started.append(self.behaviour)
        return [sys.executable, str(self.script), self.behaviour], self.script.parent


@pytest.fixture
def fake(tmp_path):
    scorer = Fake(tmp_path)
    yield scorer
    scorer.close()


def test_the_stand_in_scores_like_meteor_answers(fake):
    assert fake.score(CANDIDATES, REFERENCES) == pytest.approx(EXPECTED)
    assert fake.score(CANDIDATES[:1], REFERENCES[:1]) == pytest.approx(1.0)
    assert fake.started == ["ok"]  # one process for both


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", ["hang", "die", "garbage", "extra"])
def test_a_failing_process_is_reported_stopped_and_replaced(fake, caplog, behaviour):
    fake.timeout = 1.0 if behaviour == "hang" else 60.0
    fake.behaviour = behaviour
    with caplog.at_level(logging.WARNING, "imcap.metrics"):
        assert fake.score(CANDIDATES, REFERENCES) is None
    message = {"hang": "no answer within 1 s", "die": "the process exited (status 3)",
               "garbage": "it answered 'Exception in thread main",
               "extra": "it wrote more answers than it was asked for"}[behaviour]
    assert "METEOR skipped for these 3 captions" in caplog.text and message in caplog.text
    assert "restarts on the next call" in caplog.text
    fake.behaviour = "ok"
    assert fake.score(CANDIDATES, REFERENCES) == pytest.approx(EXPECTED)  # a fresh process, in step
    assert fake.started == [behaviour, "ok"]
