"""The token data module: the cache of ids, start-up checks, its stream windows, and the unigram baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ITOS,
    TEST,
    TEST_IDS,
    TRAIN,
    TRAIN_IDS,
    VALID_IDS,
    cache_entries,
    fresh_stopwords_loader,
    make_dm,
    write_corpus,
)

import lm_lightning.data.tokens as datamodule
from lm_lightning.data import StreamWindows, TokenDataModule, batchify
from lm_lightning.data.cache import TokenCache
from lm_lightning.errors import LMInputError


# --- 3. Token cache -----------------------------------------------------------------------------------
def test_first_run_builds_the_cache_with_the_expected_ids(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    dm = make_dm(corpus_dir, cache)
    assert dm.vocab.itos == ITOS
    (entry,) = cache_entries(cache)
    folder = cache / entry
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "test.npy", "train.npy", "valid.npy", "vocab.json"]
    assert np.load(folder / "train.npy").tolist() == TRAIN_IDS
    assert dm.ids("valid").tolist() == VALID_IDS and dm.ids("test").tolist() == TEST_IDS
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokens"] == {"train": 11, "valid": 4, "test": 4}
    assert meta["vocab_size"] == 8 and meta["corpus"] == "tiny" and meta["stopwords_source"] is None
    assert meta["settings"]["min_freq"] == 1 and meta["settings"]["tokenizer"] == "whitespace"


def test_cached_ids_are_int32_memory_maps(corpus_dir, tmp_path):
    """Opened with mmap_mode='r': a large corpus is not read into RAM, and nobody can write into the cache."""
    dm = make_dm(corpus_dir, tmp_path / "cache")
    for split in ("train", "valid", "test"):
        ids = dm.ids(split)
        assert isinstance(ids, np.memmap) and ids.dtype == np.int32 and not ids.flags.writeable


def test_second_run_hits_the_cache_without_tokenizing(corpus_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = make_dm(corpus_dir, cache)
    first_vocab = first.vocab

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("tokenize_lines ran although the cache should have been hit")

    monkeypatch.setattr(datamodule, "tokenize_lines", must_not_tokenize)
    second = make_dm(corpus_dir, cache)
    assert second.vocab == first_vocab and second.vocab_size == 8
    assert second.ids("train").tolist() == TRAIN_IDS
    assert len(cache_entries(cache)) == 1


@pytest.mark.parametrize(
    "change",
    ["content", "lowercase", "min_freq", "keep_empty_lines", "tokenizer"],
)
def test_changed_content_or_setting_misses_the_cache(corpus_dir, tmp_path, monkeypatch, change):
    """The key hashes the corpus content and every setting that changes the ids: no stale hit is possible."""
    cache = tmp_path / "cache"
    _ = make_dm(corpus_dir, cache).vocab
    (old,) = cache_entries(cache)

    calls = []
    real = datamodule.tokenize_lines
    monkeypatch.setattr(datamodule, "tokenize_lines", lambda *a, **k: calls.append(1) or real(*a, **k))
    overrides = {
        "lowercase": dict(lowercase=False),
        "min_freq": dict(min_freq=2),
        "keep_empty_lines": dict(keep_empty_lines=True),
        "tokenizer": dict(tokenizer="treebank"),
    }
    if change == "content":
        (corpus_dir / "train.txt").write_text(TRAIN + "the end\n", encoding="utf-8")
    dm = make_dm(corpus_dir, cache, **overrides.get(change, {}))
    _ = dm.vocab
    assert len(calls) == 3  # train, valid and test tokenized again
    assert len(cache_entries(cache)) == 2 and dm._cache.path.name != old


def test_interrupted_cache_write_leaves_nothing_behind(corpus_dir, tmp_path, monkeypatch):
    """A crash between two np.save calls leaves neither the entry nor its temporary folder; a rerun works."""

    class SimulatedCrash(Exception):
        pass

    real_save = np.save
    saved = []

    def crash_on_second_save(file, array, *args, **kwargs):
        saved.append(Path(file).name)
        if len(saved) == 2:
            raise SimulatedCrash("disk full")
        return real_save(file, array, *args, **kwargs)

    cache = tmp_path / "cache"
    monkeypatch.setattr(np, "save", crash_on_second_save)
    with pytest.raises(SimulatedCrash):
        _ = make_dm(corpus_dir, cache).vocab
    assert saved == ["train.npy", "valid.npy"]
    assert cache_entries(cache) == []

    monkeypatch.setattr(np, "save", real_save)
    dm = make_dm(corpus_dir, cache)
    assert dm.vocab.itos == ITOS
    assert len(cache_entries(cache)) == 1 and TokenCache(cache, cache_entries(cache)[0]).exists()


def test_split_without_tokens_after_preprocessing_is_an_input_error(tmp_path, no_nltk_data, monkeypatch):
    """Stop-word removal can empty a split: say which split, not a crash in the stream code later."""
    fresh_stopwords_loader(monkeypatch)
    folder = write_corpus(tmp_path / "stop", TRAIN, "the of and\n", TEST)
    with pytest.raises(LMInputError, match="valid split of 'stop' has no tokens"):
        _ = make_dm(folder, tmp_path / "cache", remove_stopwords=True).vocab


@pytest.mark.parametrize("overrides, split", [(dict(bptt=5), "train"), (dict(eval_batch_size=2), "valid")])
def test_datamodule_fails_at_startup_when_a_split_cannot_fill_one_window(corpus_dir, tmp_path, overrides, split):
    """train has 11 tokens, valid and test 4: bptt=5 needs 2 x 6 for train; eval_batch_size=2 needs 2 x 3 for valid."""
    have = {"train": 11, "valid": 4}[split]
    with pytest.raises(LMInputError, match=rf"The {split} split has {have} tokens, fewer than one window.*bptt"):
        _ = make_dm(corpus_dir, tmp_path / "cache", **overrides).vocab


@pytest.mark.parametrize("name", ["batch_size", "eval_batch_size", "bptt", "num_prompts"])
def test_datamodule_rejects_non_positive_sizes(tmp_path, name):
    with pytest.raises(LMInputError, match=f"--data.{name} must be a positive integer, got 0"):
        TokenDataModule(cache_dir=str(tmp_path), **{name: 0})


# --- 4. Stream batching -------------------------------------------------------------------------------
def test_batchify_drops_the_tail_and_keeps_rows_contiguous():
    streams = batchify(np.arange(13), 2)
    assert streams.dtype == torch.int32
    assert streams.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]  # token 12 is dropped
    assert batchify(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_stream_windows_match_a_hand_computed_example():
    """ids 0..12, batch_size=2, bptt=2: two rows of 6, windows of 2, a shorter last window, targets shifted by one."""
    data = StreamWindows(np.arange(13), batch_size=2, bptt=2)
    windows = [(b.inputs.tolist(), b.targets.tolist()) for b in data]
    assert windows == [
        ([[0, 1], [6, 7]], [[1, 2], [7, 8]]),
        ([[2, 3], [8, 9]], [[3, 4], [9, 10]]),
        ([[4], [10]], [[5], [11]]),
    ]
    batch = next(iter(data))
    assert batch.inputs.dtype == batch.targets.dtype == torch.long  # what nn.Embedding and cross_entropy want
    assert (batch.first_stream, batch.num_streams, batch.length, batch.divisor, batch.num_items) == (0, 2, 2, 4, 4)
    assert len(data) == 3
    assert data.num_targets == 10 == sum(b.targets.numel() for b in data) == sum(b.divisor for b in data)


@pytest.mark.parametrize("length, batch_size, bptt", [(13, 2, 2), (14, 2, 3), (30, 3, 4), (31, 1, 5), (6, 2, 2), (100, 4, 7)])
def test_len_and_num_tokens_equal_what_iteration_yields(length, batch_size, bptt):
    data = StreamWindows(np.arange(length), batch_size, bptt)
    windows = list(data)
    assert len(data) == len(windows) == math.ceil((length // batch_size - 1) / bptt)
    assert data.num_targets == sum(b.targets.numel() for b in windows) == batch_size * (length // batch_size - 1)
    assert all(b.inputs.shape[1] == b.length <= bptt for b in windows)


def test_ddp_ranks_get_disjoint_contiguous_rows():
    """world_size=2, batch_size=2: 4 streams; rank 0 takes rows 0-1, rank 1 rows 2-3; same number of windows."""
    ids = np.arange(26)
    rank0 = StreamWindows(ids, batch_size=2, bptt=2, rank=0, world_size=2)
    rank1 = StreamWindows(ids, batch_size=2, bptt=2, rank=1, world_size=2)
    assert rank0.grid().tolist() == [list(range(0, 6)), list(range(6, 12))]
    assert rank1.grid().tolist() == [list(range(12, 18)), list(range(18, 24))]
    assert set(rank0.grid().flatten().tolist()).isdisjoint(rank1.grid().flatten().tolist())
    assert len(rank0) == len(rank1) == 3
    assert next(iter(rank1)).inputs.tolist() == [[12, 13], [18, 19]]


@pytest.mark.parametrize("length, world_size", [(5, 1), (11, 2)])
def test_split_shorter_than_one_window_is_an_input_error(length, world_size):
    needed = 2 * world_size * 3
    with pytest.raises(
        LMInputError,
        match=rf"valid split has {length} tokens.*streams x devices x \(bptt \+ 1\) = 2 x {world_size} x 3 = {needed}.*--data.eval_batch_size or --data.bptt",
    ):
        StreamWindows(np.arange(length), batch_size=2, bptt=2, world_size=world_size, split="valid")
    StreamWindows(np.arange(needed), batch_size=2, bptt=2, world_size=world_size)  # exactly one window is enough


def test_datamodule_setup_streams_the_cached_ids(corpus_dir, tmp_path):
    """setup('fit') builds train (batch_size) and valid (eval_batch_size) streams from the cached ids only."""
    dm = make_dm(corpus_dir, tmp_path / "cache", batch_size=2, eval_batch_size=1, bptt=2)
    dm.setup("fit")
    assert sorted(dm.datasets) == ["train", "valid"]
    batches = [(b.inputs.tolist(), b.targets.tolist()) for b in dm.train_dataloader()]
    # TRAIN_IDS in two rows of 5: [2 4 3 7 2] and [6 1 2 5 3]; the 11th id is dropped.
    assert batches == [([[2, 4], [6, 1]], [[4, 3], [1, 2]]), ([[3, 7], [2, 5]], [[7, 2], [5, 3]])]
    assert [b.inputs.tolist() for b in dm.val_dataloader()] == [[[2, 4]], [[0]]]


# --- 8. Unigram baseline ------------------------------------------------------------------------------
def test_unigram_perplexity_equals_a_hand_computation(tmp_path):
    """train 'a a b' -> ids [2 2 3 1]; add-one counts over <unk> <eos> a b = 1 2 3 2 (sum 8).

    valid 'a c' -> ids [2 0 1]: p = 3/8, 1/8, 2/8, so ppl = (8^3 / (3*1*2))^(1/3).
    """
    folder = write_corpus(tmp_path / "uni", "a a b\n", "a c\n", "b b\n")
    dm = make_dm(folder, tmp_path / "cache", batch_size=1, eval_batch_size=1, bptt=1)
    assert dm.vocab.itos == ["<unk>", "<eos>", "a", "b"]
    assert dm.ids("valid").tolist() == [2, 0, 1]
    assert dm.unigram_perplexity("valid") == pytest.approx((8**3 / (3 * 1 * 2)) ** (1 / 3), rel=1e-12)
    assert dm.unigram_perplexity("test") == pytest.approx((8**3 / (2 * 2 * 2)) ** (1 / 3), rel=1e-12)  # b b <eos>
    assert dm.unigram_perplexity("valid") == pytest.approx(4.40257, abs=1e-5)
