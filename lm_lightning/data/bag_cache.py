"""The bag-of-words cache entry: ``vocab.json``, one CSR count matrix per split (``train.npz`` ...) and ``meta.json``.

Opened and built by ``cache.py``'s ``open_or_build`` like the token cache's entries, and checked the same way when
opened: files present, each matrix loadable, its shape, entries and dtype as recorded, and every file's sha256.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from scipy import sparse

from lm_lightning.data.cache import CacheDamaged, check_files, check_sha256, check_vocab, file_sha256
from lm_lightning.data.segments import BagVocabulary
from lm_lightning.data.splits import SPLITS

# Bump when segmenting or counting changes in a way the settings do not capture.
BAG_CACHE_VERSION = 1

BAG_FILES = ("vocab.json", *(f"{s}.npz" for s in SPLITS))


def save_bag_entry(folder: Path, vocab: BagVocabulary, counts: dict[str, sparse.csr_matrix], meta: dict) -> None:
    vocab.save(folder / "vocab.json")
    for split, matrix in counts.items():
        sparse.save_npz(folder / f"{split}.npz", matrix, compressed=False)  # read back with allow_pickle=False
    meta = {**meta, "sha256": {name: file_sha256(folder / name) for name in BAG_FILES}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def check_bag_entry(entry: Path) -> tuple[BagVocabulary, dict[str, sparse.csr_matrix]]:
    """The bag-of-words cache's checks (as the token cache's, ``data/cache.py``): files present, each matrix loadable,
    float32, ``(segments, vocab_size)`` with the recorded nnz and column ids in range, and every file's sha256."""
    meta = check_files(entry, BAG_FILES)
    vocab = check_vocab(entry, meta, BagVocabulary)
    counts = {}
    for split in SPLITS:
        name = f"{split}.npz"
        try:
            matrix = sparse.load_npz(entry / name).tocsr()
            matrix.check_format(full_check=True)  # column ids within the vocabulary, offsets monotone
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise CacheDamaged(f"{name} is unreadable: {err}") from None
        try:
            expected = (meta["segments"][split]["segments"], len(vocab)), meta["nnz"][split]
        except (KeyError, TypeError):
            raise CacheDamaged(f"meta.json has no shape for {name}") from None
        if matrix.dtype != np.float32 or (matrix.shape, matrix.nnz) != expected:
            raise CacheDamaged(
                f"{name} holds {matrix.dtype} {matrix.shape} with {matrix.nnz} entries, expected float32 {expected}"
            )
        if matrix.nnz and not (matrix.data > 0).all():
            raise CacheDamaged(f"{name} has counts that are not positive")
        counts[split] = matrix
    check_sha256(entry, meta, BAG_FILES)
    return vocab, counts
