"""On-disk cache of token ids, so a second run skips tokenization.

One folder per cache key: ``vocab.json`` plus ``train.npy``, ``valid.npy``, ``test.npy`` (int32, opened
memory-mapped so a large corpus is not read into RAM). The key hashes the corpus *content* and every setting
that changes the ids, so an edited file or a changed setting can never hit a stale entry. Each folder is
written to a temporary name and renamed when complete: an interrupted run leaves no partial entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from lm_lightning.data.sources import SPLITS
from lm_lightning.data.vocabulary import Vocabulary
from lm_lightning.io import atomic_directory

# Bump when tokenization code changes in a way the settings do not capture.
CACHE_VERSION = 1


def cache_key(content_hash: str, settings: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "content": content_hash, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class TokenCache:
    def __init__(self, root: str | Path, key: str) -> None:
        self.path = Path(root).expanduser() / key

    def exists(self) -> bool:
        return all((self.path / name).exists() for name in ("vocab.json", "meta.json", *(f"{s}.npy" for s in SPLITS)))

    def load_vocab(self) -> Vocabulary:
        return Vocabulary.load(self.path / "vocab.json")

    def load_ids(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}.npy", mmap_mode="r")

    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    def save(self, vocab: Vocabulary, ids: dict[str, np.ndarray], meta: Optional[dict] = None) -> None:
        with atomic_directory(self.path) as tmp:
            vocab.save(tmp / "vocab.json")
            for split, array in ids.items():
                np.save(tmp / f"{split}.npy", array)
            (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2, sort_keys=True))
