"""Vocabulary built from the train split only; saved as JSON next to and inside checkpoints."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from imcap.atomic_files import write_json
from imcap.errors import ImcapError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class Vocabulary:
    """Token <-> id mapping with the four special tokens at ids 0..3."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, tokens: Sequence[str]):
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ImcapError(f"vocabulary must start with {list(SPECIALS)}; got {list(tokens[:4])}")
        if len(set(tokens)) != len(tokens):
            raise ImcapError("vocabulary has duplicate tokens; rebuild it from the data")
        self.itos: list[str] = list(tokens)
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(
        cls, tokenized: Iterable[Sequence[str]], min_freq: int = 1, max_size: int | None = None
    ) -> Vocabulary:
        """Words seen at least `min_freq` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for toks in tokenized for tok in toks)
        words = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max(0, max_size - len(SPECIALS))]
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, tokens: Sequence[str], add_bos_eos: bool = True) -> list[int]:
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        return [self.bos_id, *ids, self.eos_id] if add_bos_eos else ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens up to the first <eos>, without <pad> and <bos>; <unk> is kept and shown as
        "<unk>" (a caption that needed an unknown word says so)."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                words.append(self.itos[i])
        return words

    def decode_text(self, ids: Iterable[int]) -> str:
        return " ".join(self.decode(ids))

    def save(self, path: str | Path) -> None:
        write_json(path, {"itos": self.itos}, indent=0)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            return cls(json.loads(Path(path).read_text(encoding="utf-8"))["itos"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ImcapError(f"cannot read vocabulary {path}: {e}; expected JSON {{'itos': [...]}}") from e
