"""Word <-> id mapping, saved as JSON (never pickled: a vocabulary file must be safe to open)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import numpy as np

from lm_lightning.errors import LMInputError
from lm_lightning.io import atomic_write_text

UNK = "<unk>"
EOS = "<eos>"


class Vocabulary:
    """Ids 0 and 1 are ``<unk>`` and ``<eos>``; the rest are ordered by frequency, then alphabetically."""

    specials = (UNK, EOS)

    def __init__(self, itos: list[str]) -> None:
        if list(itos[: len(self.specials)]) != list(self.specials):
            raise LMInputError(f"A vocabulary must start with {list(self.specials)}; got {itos[:2]}.")
        self.itos = list(itos)
        self.stoi = {token: i for i, token in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise LMInputError("A vocabulary must not list a token twice.")

    @classmethod
    def build(cls, counts: Counter, min_freq: int = 1, max_size: Optional[int] = None) -> Vocabulary:
        """Keep tokens seen at least ``min_freq`` times, the most frequent ``max_size`` (specials included)."""
        if min_freq < 1:
            raise LMInputError(f"min_freq must be at least 1, got {min_freq}.")
        if max_size is not None and max_size <= len(cls.specials):
            raise LMInputError(f"max_vocab_size must be larger than {len(cls.specials)}, got {max_size}.")
        words = [(w, c) for w, c in counts.items() if c >= min_freq and w not in cls.specials]
        words.sort(key=lambda wc: (-wc[1], wc[0]))  # deterministic across runs and Python hash seeds
        if max_size is not None:
            words = words[: max_size - len(cls.specials)]
        return cls(list(cls.specials) + [w for w, _ in words])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    @property
    def unk_id(self) -> int:
        return self.stoi[UNK]

    @property
    def eos_id(self) -> int:
        return self.stoi[EOS]

    def encode(self, tokens: Iterable[str]) -> list[int]:
        unk = self.unk_id
        return [self.stoi.get(t, unk) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def encode_array(self, tokens: Iterable[str]) -> np.ndarray:
        # int32 halves the cache against int64 and holds any vocabulary a single GPU can train.
        return np.asarray(self.encode(tokens), dtype=np.int32)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({"itos": self.itos}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(data["itos"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LMInputError(f"{path} is not a readable vocabulary file ({err}): delete it to rebuild it.") from None
