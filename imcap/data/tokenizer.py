"""Caption normalisation and tokenisation: NFKC, lowercase, words kept, everything else a space.

A word is a letter or digit (Unicode categories L* and N*) followed by letters, digits and
combining marks (M*: Mn, Mc, Me): the vowel signs and viramas of Hindi, Bengali and Thai, the
vowel points of Arabic and Hebrew, Vietnamese tone marks where NFKC leaves them apart. A zero
width (non-)joiner between two word characters stays in the word (Persian, the Indic scripts), as
in Unicode's word rules; variation selectors are dropped. Every other character (punctuation,
symbols, emoji, a mark with no letter before it) separates words. For English this is the
common captioning preprocessing: "dog's" -> "dog s", "black-and-white" -> "black and white".

Text written without spaces (Chinese, Japanese) is not segmented: each run between punctuation
is one token. Segment such captions into words beforehand (spaces between them, as jieba or
MeCab output) for a vocabulary of words.

Deliberately free of nltk's punkt models (not installable offline): captions are short,
single sentences, and a regular expression tokenises them reproducibly.
"""

from __future__ import annotations

import functools
import re
import unicodedata

_JOINERS = "\u200c\u200d"  # zero width non-joiner, joiner
# ASCII text has no marks or joiners: anything but a letter, digit or space is a space (3x faster)
_ASCII_NON_WORD = re.compile(r"[^\w\s]|_")
# combining marks live in planes 0, 1 and 14 (variation selectors); planes 2-3 hold ideographs
_MARK_PLANES = (range(0x20000), range(0xE0000, 0xE1000))
_VARIATION_SELECTORS = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]")


def _ranges(chars: list[int]) -> str:
    """A regex character class body for the code points `chars` (sorted), as ranges."""
    out, start = [], None
    for c, after in zip(chars, [*chars[1:], None]):
        start = c if start is None else start
        if after != c + 1:
            out.append(re.escape(chr(start)) + ("-" + re.escape(chr(c)) if c != start else ""))
            start = None
    return "".join(out)


@functools.cache
def _word() -> re.Pattern:
    """One word: a letter or digit (`[^\\W_]`: what str.isalnum takes), then letters, digits,
    combining marks, and joiners between them. Built from the running Python's Unicode tables
    on first use (0.07 s, once per process)."""
    marks = _ranges([c for plane in _MARK_PLANES for c in plane if unicodedata.category(chr(c)).startswith("M")])
    inner = rf"[^\W_]|[{marks}]"
    return re.compile(rf"[^\W_](?:{inner}|[{_JOINERS}]+(?={inner}))*")


def normalize(caption: str) -> str:
    """Lowercased caption with its words (module docstring) separated by single spaces."""
    caption = unicodedata.normalize("NFKC", caption).lower()
    if caption.isascii():
        return " ".join(_ASCII_NON_WORD.sub(" ", caption).split())
    return " ".join(_word().findall(_VARIATION_SELECTORS.sub("", caption)))


def tokenize(caption: str) -> list[str]:
    """Tokens of the normalised caption."""
    return normalize(caption).split()
