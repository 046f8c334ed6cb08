"""Caption normalisation and tokenisation: lowercase, punctuation stripped, whitespace split.

Deliberately free of nltk's punkt models (not installable offline): captions are short,
single sentences, and a regular expression tokenises them reproducibly.
"""

from __future__ import annotations

import re
import unicodedata

# Anything that is not a letter, digit or whitespace becomes a separator ("dog's" -> "dog s",
# "black-and-white" -> "black and white"), as the common captioning preprocessing does.
_NON_WORD = re.compile(r"[^\w\s]|_", flags=re.UNICODE)


def normalize(caption: str) -> str:
    """Lowercased caption with punctuation replaced by spaces and whitespace collapsed."""
    caption = unicodedata.normalize("NFKC", caption).lower()
    return " ".join(_NON_WORD.sub(" ", caption).split())


def tokenize(caption: str) -> list[str]:
    """Tokens of the normalised caption."""
    return normalize(caption).split()
