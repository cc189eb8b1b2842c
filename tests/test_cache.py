"""The token and bag-of-words caches check themselves when opened, rebuild a damaged entry with one warning, clear what
killed runs left behind, and let two processes open or build the same entry at once (issue 8)."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import ITOS, TEST_IDS, TRAIN_IDS, VALID_IDS, cache_entries, make_dm, write_corpus
from scipy import sparse

import lm_lightning.data.cache as cache_module
import lm_lightning.data.tokens as tokens_module
from lm_lightning.data import BagDataModule
from lm_lightning.data.bag_cache import check_bag_entry
from lm_lightning.data.cache import TokenCache
from lm_lightning.data.locks import clear_leftovers, entry_lock
from lm_lightning.errors import LMInputError

IDS = {"train": TRAIN_IDS, "valid": VALID_IDS, "test": TEST_IDS}


def count_tokenizing(monkeypatch) -> list[int]:
    """A list that grows by one per split tokenized: 3 for a (re)build, 0 for a cache hit."""
    calls: list[int] = []
    real = tokens_module.tokenize_lines
    monkeypatch.setattr(tokens_module, "tokenize_lines", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lm_lightning.data.cache" and r.levelno >= logging.WARNING]


def rewrite_npy(path: Path, change) -> None:
    array = np.load(path)
    path.unlink()  # the cache's copy is memory-mapped read-only elsewhere in this process: write a new file
    np.save(path, change(array))


def shuffle_vocab(entry: Path) -> None:
    itos = json.loads((entry / "vocab.json").read_text())["itos"]
    (entry / "vocab.json").write_text(json.dumps({"itos": itos[:2] + itos[2:][::-1]}))  # same size, same specials


def flip_id(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array[0] = 3 if array[0] != 3 else 2  # still a valid id: only the checksum can tell
    return array


DAMAGE = {
    "truncated-npy": (lambda e: os.truncate(e / "train.npy", (e / "train.npy").stat().st_size - 8), "train.npy is unreadable"),
    "empty-npy": (lambda e: os.truncate(e / "valid.npy", 0), "valid.npy is unreadable"),
    "appended-bytes": (lambda e: open(e / "train.npy", "ab").write(b"\0" * 8), "train.npy has 180 bytes, expected 172"),
    "deleted-npy": (lambda e: (e / "valid.npy").unlink(), "valid.npy missing"),
    "deleted-vocab": (lambda e: (e / "vocab.json").unlink(), "vocab.json missing"),
    "deleted-meta": (lambda e: (e / "meta.json").unlink(), "meta.json missing"),
    "garbage-vocab": (lambda e: (e / "vocab.json").write_bytes(b"\x00\xff not json"), "vocab.json: "),
    "shuffled-vocab": (shuffle_vocab, "vocab.json does not match the sha256 in meta.json"),
    "vocab-without-specials": (
        lambda e: (e / "vocab.json").write_text(json.dumps({"itos": ITOS[2:] + ITOS[:2]})),
        "A vocabulary must start with",
    ),
    "vocab-size": (
        lambda e: (e / "vocab.json").write_text(json.dumps({"itos": ITOS[:-1]})),
        "vocab.json has 7 tokens, meta.json says 8",
    ),
    "id-too-large": (lambda e: rewrite_npy(e / "test.npy", lambda a: np.where(a == 5, 8, a)), "test.npy has ids outside [0, 8)"),
    "negative-id": (lambda e: rewrite_npy(e / "test.npy", lambda a: -a), "test.npy has ids outside [0, 8)"),
    "int64-ids": (
        lambda e: rewrite_npy(e / "train.npy", lambda a: a.astype(np.int64)),
        "train.npy holds int64 (11,), expected int32",
    ),
    "float-ids": (lambda e: rewrite_npy(e / "train.npy", lambda a: a.astype(np.float32)), "train.npy holds float32"),
    "changed-id": (lambda e: rewrite_npy(e / "train.npy", flip_id), "train.npy does not match the sha256 in meta.json"),
    "garbage-meta": (lambda e: (e / "meta.json").write_bytes(os.urandom(64)), "meta.json is unreadable"),
    "meta-without-sha256": (lambda e: (e / "meta.json").write_text("{}"), "meta.json has no sha256"),
    "swapped-splits": (
        lambda e: os.replace(e / "valid.npy", e / "test.npy") or np.save(e / "valid.npy", np.array(TEST_IDS, np.int32)),
        "valid.npy does not match",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_token_cache_is_rebuilt_with_one_warning(corpus_dir, tmp_path, monkeypatch, caplog, damage):
    """Every kind of damage is found at open, named in one warning, and the entry is replaced by a good one."""
    cache = tmp_path / "cache"
    _ = make_dm(corpus_dir, cache).vocab
    (entry,) = [cache / name for name in cache_entries(cache)]
    damage_it, reason = DAMAGE[damage]
    damage_it(entry)
    calls = count_tokenizing(monkeypatch)
    with caplog.at_level(logging.INFO):
        dm = make_dm(corpus_dir, cache)
        assert dm.vocab.itos == ITOS and {s: dm.ids(s).tolist() for s in IDS} == IDS
    (warning,) = cache_warnings(caplog)
    assert warning.startswith(f"Token cache {entry} is damaged (") and reason in warning, warning
    assert warning.endswith("): rebuilding it.")
    assert len(calls) == 3  # tokenized again
    assert cache_entries(cache) == [entry.name]  # replaced in place: no .old, .tmp or .lock left
    TokenCache.check(entry)  # the rebuilt entry passes every check
    caplog.clear()
    assert make_dm(corpus_dir, cache).vocab_size == 8 and len(calls) == 3 and cache_warnings(caplog) == []


def test_a_good_entry_opens_without_tokenizing_or_warning(corpus_dir, tmp_path, monkeypatch, caplog):
    """The check passes on what the build wrote: meta.json records the sha256 of every other file."""
    cache = tmp_path / "cache"
    _ = make_dm(corpus_dir, cache).vocab
    entry = cache / cache_entries(cache)[0]
    meta = json.loads((entry / "meta.json").read_text())
    assert sorted(meta["sha256"]) == ["test.npy", "train.npy", "valid.npy", "vocab.json"]
    assert meta["sha256"]["train.npy"] == cache_module.file_sha256(entry / "train.npy")
    calls = count_tokenizing(monkeypatch)
    with caplog.at_level(logging.INFO):
        dm = make_dm(corpus_dir, cache)
        assert dm.ids("train").tolist() == TRAIN_IDS
    assert calls == [] and cache_warnings(caplog) == []
    assert any(r.getMessage() == f"Token cache hit: {entry}" for r in caplog.records)


def test_leftovers_of_killed_runs_are_cleared_unless_their_lock_is_held(corpus_dir, tmp_path):
    """.<key>.*.tmp and .<key>.*.old folders, temporary files and stale lock files go; those of a live build stay."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in (".0123abcd.1a2b3c4d.tmp", ".0123abcd.deadbeef.old", ".bow-99.x_y.tmp"):
        (cache / name).mkdir()
        (cache / name / "train.npy").write_bytes(b"half")
    (cache / ".vocab.json.k2j4.tmp").write_text("half")
    (cache / ".0123abcd.lock").touch()  # its process was killed: nobody holds it
    (cache / ".busy.a1.tmp").mkdir()
    (cache / "not-a-leftover.tmp").touch()
    with entry_lock(cache / "busy") as held:  # a live build of "busy", as another process would hold it
        assert held is True
        _ = make_dm(corpus_dir, cache).vocab
        assert (cache / ".busy.a1.tmp").is_dir()
    entries = cache_entries(cache)
    assert ".busy.a1.tmp" in entries and "not-a-leftover.tmp" in entries
    assert [e for e in entries if e.startswith(".") and e != ".busy.a1.tmp"] == []
    assert clear_leftovers(cache) == [cache / ".busy.a1.tmp"]  # once the lock is free


def _kill_during_save(corpus: Path, cache: Path) -> None:
    real_save = np.save

    def save_then_die(file, array, *args, **kwargs):
        real_save(file, array, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    np.save = save_then_die
    _ = make_dm(corpus, cache).vocab


def run_in_child(target, *args) -> int:
    """Run ``target`` in a forked process (inherits the imported modules, so it starts in milliseconds); its exit code."""
    process = multiprocessing.get_context("fork").Process(target=target, args=args)
    process.start()
    process.join(60)
    return process.exitcode


def test_a_build_killed_by_sigkill_leaves_leftovers_that_the_next_open_clears(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    assert run_in_child(_kill_during_save, corpus_dir, cache) == -signal.SIGKILL
    left = cache_entries(cache)
    assert sorted(name.rsplit(".", 1)[1] for name in left) == ["lock", "tmp"], left  # what a kill leaves
    dm = make_dm(corpus_dir, cache)
    assert dm.ids("train").tolist() == TRAIN_IDS
    assert cache_entries(cache) == [dm._cache.path.name]


def _open_together(corpus: Path, cache: Path, barrier, log_path: Path) -> None:
    real = tokens_module.tokenize_lines

    def slow_tokenize(*args, **kwargs):
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()}\n")
        import time

        time.sleep(0.2)  # long enough that the other process tries to open while this one builds
        return real(*args, **kwargs)

    tokens_module.tokenize_lines = slow_tokenize
    dm = make_dm(corpus, cache)
    barrier.wait(30)
    assert {s: dm.ids(s).tolist() for s in IDS} == IDS, "wrong ids"


@pytest.mark.parametrize("start", ["missing", "damaged"])
def test_two_processes_opening_one_key_build_it_once(corpus_dir, tmp_path, start):
    """Two DDP ranks starting together: one builds (or repairs) the entry, the other waits for it and reads it."""
    cache = tmp_path / "cache"
    if start == "damaged":
        _ = make_dm(corpus_dir, cache).vocab
        os.truncate(next(cache.iterdir()) / "train.npy", 100)
    barrier = multiprocessing.get_context("fork").Barrier(2)
    log_path = tmp_path / "tokenized.log"
    processes = [
        multiprocessing.get_context("fork").Process(target=_open_together, args=(corpus_dir, cache, barrier, log_path))
        for _ in range(2)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0, 0]
    tokenized = log_path.read_text().split()
    assert len(tokenized) == 3 and len(set(tokenized)) == 1  # one process tokenized the three splits, once
    assert len(cache_entries(cache)) == 1
    TokenCache.check(cache / cache_entries(cache)[0])


# --- the cache folder itself ----------------------------------------------------------------------------
def test_cache_dir_that_is_a_file_names_the_flag(corpus_dir, tmp_path):
    path = tmp_path / "cache"
    path.write_text("not a folder")
    with pytest.raises(LMInputError, match=rf"^--data.cache_dir {path} is a file, not a folder: give a folder"):
        _ = make_dm(corpus_dir, path).vocab
    with pytest.raises(
        LMInputError, match=rf"^--data.cache_dir {path / 'sub'} cannot be created \(Not a directory\): give a folder"
    ):
        _ = make_dm(corpus_dir, path / "sub").vocab
    assert path.read_text() == "not a folder"


def deny_writes(root: Path, monkeypatch) -> None:
    """Make ``root`` read-only; as root (which ignores modes) also fail the first write the way the kernel would."""
    root.chmod(0o555)
    if os.geteuid() == 0:

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(root / ".lock"))

        monkeypatch.setattr(cache_module, "entry_lock", denied)


def test_read_only_cache_dir_opens_a_good_entry_and_names_the_flag_when_it_must_build(corpus_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _ = make_dm(corpus_dir, cache).vocab
    try:
        deny_writes(cache, monkeypatch)
        assert make_dm(corpus_dir, cache).ids("test").tolist() == TEST_IDS  # reading needs no lock
        with pytest.raises(
            LMInputError, match=rf"^--data.cache_dir {cache} is not writable \(Permission denied\): give a folder you"
        ):
            _ = make_dm(corpus_dir, cache, min_freq=2).vocab  # another key: must be built
    finally:
        cache.chmod(0o755)
    assert len(cache_entries(cache)) == 1


def test_full_disk_while_writing_the_cache_is_one_sentence(corpus_dir, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    cache = tmp_path / "cache"
    with pytest.raises(LMInputError, match=rf"^The disk holding --data.cache_dir {cache} is full, so the token cache was not"):
        _ = make_dm(corpus_dir, cache).vocab
    assert not cache.exists()  # the cache folder this start created is gone again: nothing on disk changed


def long_corpus(folder: Path) -> Path:
    """Half a megabyte of text per split in 7 words: its token ids are far more than a 64 KiB disk holds."""
    text = ("the cat sat on a mat . " * 40 + "\n") * 600
    return write_corpus(folder, text, text, text)


@pytest.mark.parametrize("kind", ["token", "bag-of-words"])
def test_a_really_full_disk_while_writing_a_cache_is_one_sentence(kind, small_disk, tmp_path):
    """On a real full disk numpy's tofile reports a short write with no errno ("... requested and ... written"):
    still one sentence, and nothing left in the cache folder."""
    cache, corpus = small_disk(64), long_corpus(tmp_path / "long")
    dm = make_dm(corpus, cache) if kind == "token" else bag_dm(corpus, cache)
    with pytest.raises(LMInputError, match=rf"^The disk holding --data.cache_dir {cache} is full, so the {kind} cache was not"):
        _ = dm.vocab
    assert cache_entries(cache) == []


# --- the bag-of-words cache -----------------------------------------------------------------------------
def bag_dm(corpus: Path, cache: Path) -> BagDataModule:
    return BagDataModule(str(corpus), segment="line", min_df=1, batch_size=2, eval_batch_size=1, bptt=1, cache_dir=str(cache))


def bad_column(entry: Path) -> None:
    with np.load(entry / "train.npz") as f:
        arrays = dict(f)
    arrays["indices"] = arrays["indices"].copy()
    arrays["indices"][0] = arrays["shape"][1]  # one past the last word
    np.savez(entry / "train.npz", **arrays)


BAG_DAMAGE = {
    "truncated-npz": (lambda e: os.truncate(e / "train.npz", 100), "train.npz is unreadable"),
    "deleted-npz": (lambda e: (e / "valid.npz").unlink(), "valid.npz missing"),
    "column-out-of-range": (bad_column, "train.npz is unreadable"),
    "swapped-splits": (lambda e: os.replace(e / "train.npz", e / "test.npz"), "train.npz missing"),
    "wrong-shape": (
        lambda e: sparse.save_npz(e / "valid.npz", sparse.load_npz(e / "train.npz"), compressed=False),
        "valid.npz holds float32",
    ),
    "shuffled-vocab": (shuffle_vocab, "vocab.json does not match the sha256"),
    "garbage-meta": (lambda e: (e / "meta.json").write_text("{not json"), "meta.json is unreadable"),
}


@pytest.mark.parametrize("damage", list(BAG_DAMAGE))
def test_damaged_bag_cache_is_rebuilt_with_one_warning(tmp_path, caplog, damage):
    lines = "the cat sat on the mat\nthe dog sat on the log\n"
    corpus = write_corpus(tmp_path / "corpus", lines * 20, lines * 10, lines * 12)
    cache = tmp_path / "cache"
    first = bag_dm(corpus, cache)
    counts = {s: first.counts(s).toarray() for s in IDS}
    (entry,) = [cache / name for name in cache_entries(cache)]
    damage_it, reason = BAG_DAMAGE[damage]
    damage_it(entry)
    with caplog.at_level(logging.INFO):
        dm = bag_dm(corpus, cache)
        assert all(np.array_equal(dm.counts(s).toarray(), counts[s]) for s in IDS)
    (warning,) = cache_warnings(caplog)
    assert warning.startswith(f"Bag-of-words cache {entry} is damaged (") and reason in warning, warning
    assert any(r.getMessage() == f"Bag-of-words cache written: {entry}" for r in caplog.records)
    assert cache_entries(cache) == [entry.name]
    check_bag_entry(entry)
