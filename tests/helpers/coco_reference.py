"""What the metric tests compare against: coco-caption itself (pycocoevalcap and its jars), and
a reproducible sample of real Flickr8k captions."""

from __future__ import annotations

import atexit
import csv
import functools
import random
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

from imcap.metrics.java import pycocoevalcap_dir
from tests.helpers.paths import SHARED_DATA

FLICKR_CAPTIONS = SHARED_DATA / "flickr8k-captions-all.txt"
requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs `java` on PATH")
requires_flickr = pytest.mark.skipif(not FLICKR_CAPTIONS.is_file(), reason=f"{FLICKR_CAPTIONS} not found")


def flickr_sample(n_images: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """`n_images` random Flickr8k images: (image names, their 5 raw reference captions)."""
    captions = defaultdict(list)
    with open(FLICKR_CAPTIONS, newline="", encoding="utf-8") as f:
        for image, caption in list(csv.reader(f))[1:]:
            captions[image].append(caption)
    images = random.Random(seed).sample(sorted(captions), n_images)
    return images, [captions[i] for i in images]


def make_candidates(references: list[list[str]], seed: int = 0) -> list[str]:
    """Candidates of every quality: a held-out reference, a truncated one, another image's."""
    rng = random.Random(seed)
    candidates = []
    for refs in references:
        pick, own = rng.random(), refs[0].split()
        other = rng.choice(references)[1]
        candidates.append(" ".join(own) if pick < 0.4 else " ".join(own[: rng.randint(1, 6)])
                          if pick < 0.8 else other)
    return candidates


def java_ptb(captions: list[str], tmp_path: Path) -> list[str]:
    """coco-caption's tokenisation by the real jar (PTBTokenizer -preserveLines -lowerCase, then
    PUNCTUATIONS removed), each caption read as if the next line were an ordinary word: a dummy
    line goes between captions so that no caption sees its neighbour or the end of the file."""
    source = tmp_path / "ptb-input.txt"
    source.write_text("".join(c.replace("\n", " ") + "\nx\n" for c in captions), encoding="utf-8")
    jar = pycocoevalcap_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    out = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                          "-preserveLines", "-lowerCase", str(source)],
                         capture_output=True, check=True).stdout.decode("utf-8").split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
            for line in out[0 : 2 * len(captions) : 2]]


def as_coco(candidates: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """(gts, res) in the form pycocoevalcap's scorers take."""
    return ({i: list(r) for i, r in enumerate(references)}, {i: [c] for i, c in enumerate(candidates)})


@functools.cache
def coco_meteor() -> Meteor:
    """pycocoevalcap's Meteor, one for the whole test session: its Java process takes seconds
    (of a CPU the other tests want) to load the paraphrase table."""
    meteor = Meteor()
    atexit.register(meteor.meteor_p.kill)
    return meteor
