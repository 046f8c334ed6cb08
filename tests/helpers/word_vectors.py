"""A tiny GloVe text file and the vocabulary tests read it with."""

from __future__ import annotations

from pathlib import Path

VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "red", "circle", "a", "zebra", "new york"]
VOCAB_FOUND_IN_GLOVE = [False, False, False, False, True, True, True, False, True]
PACKAGED_WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "the", "dog", "Frisbee", "qwzxv"]


def write_glove_file(folder: Path) -> Path:
    """GloVe text: no header; 3-d; a word with a space in it; 'Red' in two casings."""
    path = folder / "glove.3d.txt"
    path.write_text("the 0.1 0.2 0.3\nRed 9 9 9\nred 1.0 -1.0 0.5\ncircle 2 0 0\n"
                    "a -0.5 0.25 1.25e-1\nnew york 7 7 7\n", encoding="utf-8")
    return path
