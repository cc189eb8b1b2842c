"""On-disk cache of token ids, so a second run skips tokenization; the checks and build steps every cache shares.

One folder per cache key: ``vocab.json`` plus ``train.npy``, ``valid.npy``, ``test.npy`` (int32, opened
memory-mapped so a large corpus is not read into RAM) and ``meta.json``, which records every file's sha256. The key
hashes the corpus *content* and every setting that changes the ids, so an edited file or a changed setting can never
hit a stale entry.

An entry checks itself when opened (issue 8): files present, dtype, shape and file size, ids in ``[0, vocab_size)``,
the vocabulary's size and special tokens, and the sha256 of every file against ``meta.json``. The full hash costs
less than what every run already does to find the key (read and hash the corpus text, which is larger than its ids;
docs/ has the numbers), so nothing cheaper is used. A damaged entry is rebuilt with one warning, and the rebuilt
folder replaces it (``atomic_directory(replace=True)``).

Builds hold the entry's lock (``locks.py``), so two processes (DDP ranks) opening the same key tokenize once: the
second waits, then finds the entry built. Leftovers of killed runs are removed at open whenever no live process holds
their key's lock.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from lm_lightning.data.locks import clear_leftovers, entry_lock
from lm_lightning.data.splits import SPLITS
from lm_lightning.data.vocabulary import Vocabulary
from lm_lightning.errors import LMInputError
from lm_lightning.io import atomic_directory, disk_full, file_sha256

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bump when tokenization code changes in a way the settings do not capture.
# 2: meta.json records the sha256 of every file; long lines are tokenized in chunks.
CACHE_VERSION = 2


class CacheMissing(Exception):
    """The entry does not exist (yet)."""


class CacheDamaged(Exception):
    """The entry exists but fails a check; the message says which."""


def cache_key(content_hash: str, settings: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "content": content_hash, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepare_root(root: Path) -> bool:
    """The cache folder must be a folder we can create (True if created now); one sentence naming ``--data.cache_dir``
    otherwise."""
    if root.exists() and not root.is_dir():
        raise LMInputError(f"--data.cache_dir {root} is a file, not a folder: give a folder (it is created if missing).")
    if root.is_dir():
        return False
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LMInputError(
            f"--data.cache_dir {root} cannot be created ({err.strerror}): give a folder you can write to."
        ) from None
    return True


def open_or_build(entry: Path, check: Callable[[Path], T], write: Callable[[Path], None], what: str) -> T:
    """``check(entry)`` if the entry passes; otherwise build it with ``write(folder)`` under the entry's lock and
    put it in place (replacing a damaged one), then check it again. ``check`` raises CacheMissing or CacheDamaged."""
    root = entry.parent
    created = prepare_root(root)
    clear_leftovers(root)
    try:
        return _checked(check, entry)  # the common path takes no lock, so a read-only shared cache works
    except (CacheMissing, CacheDamaged):
        pass
    try:
        _build(entry, check, write, what)
    except BaseException:
        if created:  # a failed start leaves the disk as it found it
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    try:
        return _checked(check, entry)
    except (CacheMissing, CacheDamaged) as err:
        raise LMInputError(
            f"--data.cache_dir {root}: the {what} written just now fails its check ({err}): check the disk, or give another folder."
        ) from None


def _build(entry: Path, check: Callable[[Path], T], write: Callable[[Path], None], what: str) -> None:
    root = entry.parent
    try:
        with entry_lock(entry):
            try:
                _checked(check, entry)
                return  # another process built or repaired it while we waited
            except CacheMissing:
                pass
            except CacheDamaged as err:
                log.warning("%s %s is damaged (%s): rebuilding it.", what, entry, err)
            with atomic_directory(entry, replace=True) as tmp:
                write(tmp)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise LMInputError(
                f"--data.cache_dir {root} is not writable ({err.strerror}): give a folder you can write to."
            ) from None
        if disk_full(err):  # numpy's tofile reports a short write with no errno
            raise LMInputError(
                f"The disk holding --data.cache_dir {root} is full, so the {what.lower()} was not written: free space "
                "there or give --data.cache_dir on another disk."
            ) from None
        raise


def _checked(check: Callable[[Path], T], entry: Path) -> T:
    try:
        return check(entry)
    except OSError as err:  # e.g. a file made unreadable: rebuilding replaces it
        raise CacheDamaged(f"{err.strerror}: {err.filename}") from None


def read_meta(entry: Path) -> dict:
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CacheDamaged(f"meta.json is unreadable: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict):
        raise CacheDamaged("meta.json has no sha256 of the files")
    return meta


def check_files(entry: Path, names: tuple[str, ...]) -> dict:
    """Presence of ``names`` and ``meta.json``, then meta.json itself; returns the meta."""
    if not entry.is_dir():
        raise CacheMissing(entry)
    missing = [name for name in ("meta.json", *names) if not (entry / name).is_file()]
    if missing:
        raise CacheDamaged(f"{', '.join(missing)} missing")
    return read_meta(entry)


def check_sha256(entry: Path, meta: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if file_sha256(entry / name) != meta["sha256"].get(name):
            raise CacheDamaged(f"{name} does not match the sha256 in meta.json")


def check_vocab(entry: Path, meta: dict, vocab_class: type[Vocabulary] = Vocabulary) -> Vocabulary:
    try:
        vocab = vocab_class.load(entry / "vocab.json")
    except LMInputError as err:
        raise CacheDamaged(f"vocab.json: {err}") from None
    if len(vocab) != meta.get("vocab_size"):
        raise CacheDamaged(f"vocab.json has {len(vocab)} tokens, meta.json says {meta.get('vocab_size')}")
    return vocab


# --- the token cache ------------------------------------------------------------------------------------
class TokenCache:
    files = ("vocab.json", *(f"{s}.npy" for s in SPLITS))

    def __init__(self, root: str | Path, key: str) -> None:
        self.path = Path(root).expanduser() / key
        self._ids: dict[str, np.ndarray] = {}

    def exists(self) -> bool:
        return all((self.path / name).exists() for name in ("meta.json", *self.files))

    def open(self, build: Callable[[], tuple[Vocabulary, dict[str, np.ndarray], dict]]) -> Vocabulary:
        """The checked vocabulary; ids come from ``load_ids``. ``build()`` runs only if the entry is missing or damaged."""

        def write(folder: Path) -> None:
            self.save_to(folder, *build())

        vocab, self._ids = open_or_build(self.path, self.check, write, "Token cache")
        return vocab

    def load_ids(self, split: str) -> np.ndarray:
        """The split's ids as checked by ``open`` (memory-mapped, read-only)."""
        return self._ids[split]

    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    @staticmethod
    def check(entry: Path) -> tuple[Vocabulary, dict[str, np.ndarray]]:
        """Everything ``open`` promises (module docstring), cheapest first; raises CacheMissing or CacheDamaged."""
        meta = check_files(entry, TokenCache.files)
        vocab = check_vocab(entry, meta)
        ids = {}
        for split in SPLITS:
            path = entry / f"{split}.npy"
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:  # a truncated file fails here ("mmap length is greater ...")
                raise CacheDamaged(f"{path.name} is unreadable: {err}") from None
            expected = meta.get("tokens", {}).get(split) if isinstance(meta.get("tokens"), dict) else None
            if array.dtype != np.int32 or array.shape != (expected,):
                raise CacheDamaged(f"{path.name} holds {array.dtype} {array.shape}, expected int32 ({expected},)")
            if path.stat().st_size != array.offset + array.nbytes:
                raise CacheDamaged(f"{path.name} has {path.stat().st_size} bytes, expected {array.offset + array.nbytes}")
            if array.size and (int(array.min()) < 0 or int(array.max()) >= len(vocab)):
                raise CacheDamaged(f"{path.name} has ids outside [0, {len(vocab)})")
            ids[split] = array
        check_sha256(entry, meta, TokenCache.files)
        return vocab, ids

    @staticmethod
    def save_to(folder: Path, vocab: Vocabulary, ids: dict[str, np.ndarray], meta: dict) -> None:
        vocab.save(folder / "vocab.json")
        for split, array in ids.items():
            np.save(folder / f"{split}.npy", array)
        meta = {**meta, "sha256": {name: file_sha256(folder / name) for name in TokenCache.files}}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
