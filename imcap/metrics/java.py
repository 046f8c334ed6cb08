"""coco-caption's Java scorers (METEOR 1.5, SPICE 1.0), run from the jars inside pycocoevalcap.

Free of torch on purpose, like the tokenizer: the score CLI starts METEOR's Java process (seconds
to load its paraphrase table) before it loads torch. When a scorer cannot run here it says why
once in the log (not once per validation epoch) and returns None; it never raises for that.
METEOR's process is read with a timeout and every answer is checked: when it hangs, exits or
answers out of step, the process is stopped (never reused with unread output), the failure is
logged and that score is None; the next call starts a fresh process.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("imcap.metrics")
_noted: set[str] = set()

SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# the archive pycocoevalcap's get_stanford_models.py fetches them from
SPICE_CORENLP_URL = "https://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
_METEOR_CHUNK = 256  # SCORE lines written before reading their answers (no pipe ever fills up)
_PIPE_BUF = 4096  # a write this small into a pipe that select() calls writable does not block


def note_once(key: str, message: str) -> None:
    if key not in _noted:
        _noted.add(key)
        log.warning(message)


def java_executable() -> str | None:
    return shutil.which("java")


def pycocoevalcap_dir() -> Path | None:
    """The installed pycocoevalcap package, found without importing it."""
    spec = importlib.util.find_spec("pycocoevalcap")  # a namespace package: no __init__.py
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def spice_dir() -> Path | None:
    package = pycocoevalcap_dir()
    return package / "spice" if package is not None else None


class MeteorFailure(Exception):
    """METEOR's process hung, exited or answered out of step."""


def _numbers(line: str, what: str) -> str:
    """`line` if it is the space-separated numbers METEOR answers with."""
    try:
        if not [float(x) for x in line.split()]:
            raise ValueError
    except ValueError:
        raise MeteorFailure(f"it answered {line[:60]!r} where {what} was expected") from None
    return line


class _Pipe:
    """Lines to and from a process, each write and each answer bounded by `timeout` seconds.
    Reads go straight to the file descriptor: no buffer but this one can hide unread output."""

    def __init__(self, proc: subprocess.Popen, timeout: float):
        self.proc, self.timeout, self.buffer = proc, timeout, b""
        self.out, self.inp = proc.stdout.fileno(), proc.stdin.fileno()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not select.select([], [self.inp], [], self.timeout)[1]:
                raise MeteorFailure(f"it read nothing for {self.timeout:g} s")
            try:
                view = view[os.write(self.inp, view[:_PIPE_BUF]):]
            except BrokenPipeError:
                raise MeteorFailure(self._exited()) from None

    def readline(self) -> str:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.out], [], [], left)[0]:
                raise MeteorFailure(f"no answer within {self.timeout:g} s")
            block = os.read(self.out, 65536)
            if not block:
                raise MeteorFailure(self._exited())
            self.buffer += block
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode("utf-8", "replace").strip()

    def pending(self) -> bool:
        return bool(self.buffer) or bool(select.select([self.out], [], [], 0)[0])

    def _exited(self) -> str:
        try:
            status = self.proc.wait(1)
        except subprocess.TimeoutExpired:
            status = None
        return f"the process exited (status {status}); if it ran out of memory, try a larger max_memory"


class MeteorScorer:
    """METEOR 1.5 spoken to exactly as pycocoevalcap's `Meteor` does: one persistent
    `java -jar meteor-1.5.jar - - -stdio -l en -norm`, started on first use (or by `start()`);
    a `SCORE ||| refs ||| hypothesis` line per image returns its statistics, then one
    `EVAL ||| stats ||| ...` line returns the per-image scores and the corpus score.
    The process never travels with a pickled or copied scorer: the copy starts its own."""

    def __init__(self, max_memory: str = "2G", timeout: float = 300.0) -> None:
        self.max_memory = max_memory
        self.timeout = timeout  # seconds for each answer (the first waits for Java to load: ~7 s here)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def available(self) -> bool:
        """Whether METEOR can run here; if not, says why once (in the log) and returns False."""
        if java_executable() is None:
            note_once("meteor-java", "METEOR skipped: `java` is not on PATH (install a JRE to compute it)")
            return False
        package = pycocoevalcap_dir()
        if package is None or not (package / "meteor" / "meteor-1.5.jar").is_file():
            note_once("meteor-jar", "METEOR skipped: meteor-1.5.jar not found (pip install pycocoevalcap==1.2)")
            return False
        return True

    def command(self) -> tuple[list[str], Path]:
        """The command line and the folder it runs in (pycocoevalcap's, with the memory cap)."""
        return ([java_executable() or "java", "-jar", f"-Xmx{self.max_memory}", "meteor-1.5.jar",
                 "-", "-", "-stdio", "-l", "en", "-norm"], Path(pycocoevalcap_dir()) / "meteor")

    def start(self) -> subprocess.Popen:
        """The running process, started now if it is not (returns at once; Java loads on)."""
        if self._proc is None or self._proc.poll() is not None:
            cmd, cwd = self.command()
            self._proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return self._proc

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
        """Corpus METEOR of tokenised captions, or None when METEOR cannot run here or failed
        (logged; its process is stopped and the next call starts a fresh one)."""
        if not self.available():
            return None
        with self._lock:
            try:
                return self._score(self.start(), candidates, references)
            except MeteorFailure as e:
                log.warning("METEOR skipped for these %d captions: %s; its process was stopped and restarts "
                            "on the next call", len(candidates), e)
                self.close()
                return None

    def _score(self, proc: subprocess.Popen, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        pipe = _Pipe(proc, self.timeout)
        stats = []
        for begin in range(0, len(candidates), _METEOR_CHUNK):
            lines = []
            end = begin + _METEOR_CHUNK
            for hyp, refs in zip(candidates[begin:end], references[begin:end]):
                hyp = hyp.replace("|||", "").replace("  ", " ")  # as pycocoevalcap does
                lines.append(" ||| ".join(("SCORE", " ||| ".join(refs), hyp)) + "\n")
            pipe.write("".join(lines).encode("utf-8"))
            stats.extend(_numbers(pipe.readline(), "statistics") for _ in lines)
        pipe.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
        for _ in stats:  # the per-image scores, unused
            _numbers(pipe.readline(), "a score")
        value = float(_numbers(pipe.readline(), "a score"))
        if pipe.pending():
            raise MeteorFailure("it wrote more answers than it was asked for")
        return value

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.stdin.close()
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"max_memory": self.max_memory, "timeout": self.timeout}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


class SpiceScorer:
    """SPICE run as pycocoevalcap's `Spice` runs it (`-subset -silent`, the mean of each image's
    "All" F-score), in a temporary folder. Optional: the jar also needs Stanford CoreNLP 3.6.0
    in `spice/lib`, which pycocoevalcap downloads on first use and nothing here downloads.
    Scene-graph parsing takes minutes per thousand captions and up to 8 GB."""

    def __init__(self, max_memory: str = "8G") -> None:
        self.max_memory = max_memory

    def available(self) -> bool:
        """Whether SPICE can run here; if not, says why once (in the log) and returns False."""
        if java_executable() is None:
            note_once("spice-java", "SPICE skipped: `java` is not on PATH")
            return False
        folder = spice_dir()
        if folder is None or not all((folder / "lib" / jar).is_file() for jar in SPICE_CORENLP_JARS):
            where = folder / "lib" if folder else "pycocoevalcap/spice/lib"
            note_once("spice-corenlp", f"SPICE skipped: it needs Stanford CoreNLP 3.6.0 in {where} "
                      f"({', '.join(SPICE_CORENLP_JARS)}), which is not installed; to enable it, copy those "
                      f"two jars there from {SPICE_CORENLP_URL}")
            return False
        return True

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
        """Mean SPICE F-score of tokenised captions, or None when SPICE cannot run here."""
        if not self.available():
            return None
        items = [{"image_id": i, "test": c, "refs": list(r)}
                 for i, (c, r) in enumerate(zip(candidates, references))]
        with tempfile.TemporaryDirectory(prefix="imcap-spice-") as tmp:
            source, target = Path(tmp) / "in.json", Path(tmp) / "out.json"
            source.write_text(json.dumps(items), encoding="utf-8")
            cmd = [java_executable(), "-jar", f"-Xmx{self.max_memory}", "spice-1.0.jar", str(source),
                   "-cache", str(Path(tmp) / "cache"), "-out", str(target), "-subset", "-silent"]
            run = subprocess.run(cmd, cwd=spice_dir(), capture_output=True, text=True)
            if run.returncode != 0:
                tail = run.stderr.strip().splitlines()[-1:] or ["no output"]
                note_once("spice-failed", f"SPICE skipped: the jar failed ({tail[0]})")
                return None
            results = json.loads(target.read_text(encoding="utf-8"))
        return sum(_as_float(r["scores"]["All"]["f"]) for r in results) / len(results)


def _as_float(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # pycocoevalcap turns unparsable scores into NaN too
