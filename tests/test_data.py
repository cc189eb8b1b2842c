"""The data pipeline: preprocessing, vocabulary, token cache, stream batching, splits, sources and downloads.

Everything here is offline, small and deterministic. The corpora kept in ``../shared`` (NLTK data, PTB,
WikiText-2) are used when present and the tests that need them are skipped, with the reason, otherwise.
Tests that must see NLTK data present or absent point ``nltk.data.path`` at a folder themselves instead of
depending on what this machine has installed.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from collections import Counter
from pathlib import Path

import nltk
import numpy as np
import pytest
import torch
from nltk.corpus.reader import PlaintextCorpusReader, StopwordsCorpusReader
from nltk.corpus.util import LazyCorpusLoader

import lm_lightning.data.tokens as datamodule
from lm_lightning.data import TokenDataModule, Preprocessor, StreamWindows, Vocabulary, batchify, load_corpus
from lm_lightning.data.cache import TokenCache
from lm_lightning.data.tokens import tokenize_lines
from lm_lightning.data.sources import NAMED_DATASETS, NamedDataset, download, named_corpus, split_documents
from lm_lightning.errors import LMInputError

ROOT = Path(__file__).resolve().parents[1]


def shared(*parts: str) -> Path | None:
    """A path under the shared read-only data folder (next to the repository, or inside it), if present."""
    for base in (ROOT.parent / "shared", ROOT / "shared"):
        if base.joinpath(*parts).exists():
            return base.joinpath(*parts)
    return None


SHARED_NLTK = shared("nltk_data")
SHARED_PTB = shared("data", "ptb")
SHARED_WT2 = shared("data", "wikitext-2")


@pytest.fixture
def shared_nltk(monkeypatch):
    """NLTK searches ../shared/nltk_data first (skipped where that folder is absent)."""
    if SHARED_NLTK is None:
        pytest.skip("../shared/nltk_data is not present")
    monkeypatch.setattr(nltk.data, "path", [str(SHARED_NLTK), *nltk.data.path])
    return SHARED_NLTK


@pytest.fixture
def no_nltk_data(monkeypatch, tmp_path):
    """NLTK searches only an empty folder: every corpus (stopwords, wordnet, ...) is missing."""
    empty = tmp_path / "empty_nltk_data"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [str(empty)])
    return empty


def fresh_stopwords_loader(monkeypatch) -> None:
    """A not-yet-loaded ``nltk.corpus.stopwords``: once loaded, NLTK's lazy loader never looks at the path again."""
    loader = LazyCorpusLoader("stopwords", StopwordsCorpusReader, r"(?!README|\.).*", encoding="utf8")
    monkeypatch.setattr(nltk.corpus, "stopwords", loader)


def write_corpus(folder: Path, train: str, valid: str, test: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")
    return folder


# A corpus small enough to encode by hand (whitespace tokens, min_freq=1):
#   train counts: the 3, sat 2, cat/dog/mat/on 1 -> itos <unk> <eos> the sat cat dog mat on
TRAIN = "the cat sat on the mat\nthe dog sat\n"
VALID = "the cat ran\n"
TEST = "a dog sat\n"
ITOS = ["<unk>", "<eos>", "the", "sat", "cat", "dog", "mat", "on"]
TRAIN_IDS = [2, 4, 3, 7, 2, 6, 1, 2, 5, 3, 1]
VALID_IDS = [2, 4, 0, 1]  # "ran" is unknown
TEST_IDS = [0, 5, 3, 1]  # "a" is unknown


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    return write_corpus(tmp_path / "tiny", TRAIN, VALID, TEST)


def make_dm(source: Path, cache: Path, **overrides) -> TokenDataModule:
    settings = dict(tokenizer="whitespace", min_freq=1, batch_size=2, eval_batch_size=1, bptt=2)
    settings.update(overrides)
    return TokenDataModule(source=str(source), cache_dir=str(cache), **settings)


def cache_entries(cache: Path) -> list[str]:
    """Everything in the cache root, hidden temporary folders included."""
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# --- 1. Preprocessing ---------------------------------------------------------------------------------
def test_treebank_tokenizer_splits_contractions_and_punctuation():
    """NLTK's Treebank rules, applied per line without Punkt: exact tokens, with and without lowercasing."""
    line = "Don't stop, it's fine."
    assert Preprocessor("treebank", lowercase=False)(line) == ["Do", "n't", "stop", ",", "it", "'s", "fine", "."]
    assert Preprocessor("treebank")(line) == ["do", "n't", "stop", ",", "it", "'s", "fine", "."]
    assert Preprocessor("treebank", lowercase=False)('He said "hi" (twice) for $3.50!') == [
        "He", "said", "``", "hi", "''", "(", "twice", ")", "for", "$", "3.50", "!",
    ]  # fmt: skip


def test_whitespace_tokenizer_only_splits_on_whitespace():
    """Pre-tokenized corpora (PTB, WikiText) must keep their tokens, e.g. <unk> and @-@, untouched."""
    p = Preprocessor("whitespace", lowercase=False)
    assert p("  The <unk>  @-@ b\tc \n") == ["The", "<unk>", "@-@", "b", "c"]
    assert Preprocessor("whitespace")("The CAT Sat") == ["the", "cat", "sat"]


def test_char_tokenizer_keeps_inner_spaces_and_drops_line_ends():
    """Inner spaces are tokens (generated text stays readable); the line end becomes <eos> later, not a token."""
    p = Preprocessor("char", lowercase=False)
    assert p("Hi  yo\r\n") == ["H", "i", " ", " ", "y", "o"]
    assert Preprocessor("char")("AbC") == ["a", "b", "c"]


def test_stopwords_come_from_nltk_when_its_corpus_is_found(shared_nltk, monkeypatch):
    """With NLTK's stopwords corpus on the path, NLTK's list (which lacks e.g. 'hence') is used."""
    fresh_stopwords_loader(monkeypatch)
    p = Preprocessor("whitespace", lowercase=False, remove_stopwords=True)
    assert p.stopwords_source == "nltk"
    assert {"the", "on", "because"} <= p.stopwords and "hence" not in p.stopwords
    # Case-insensitive match even without lowercasing: "The" goes, "Cat" keeps its case.
    assert p("The Cat sat on the mat because hence") == ["Cat", "sat", "mat", "hence"]


def test_stopwords_fall_back_to_scikit_learn_without_nltk_data(no_nltk_data, monkeypatch):
    """No NLTK stopwords corpus: scikit-learn's English list (318 words, 'hence' included) is used instead."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    fresh_stopwords_loader(monkeypatch)
    p = Preprocessor("treebank", remove_stopwords=True)
    assert p.stopwords_source == "scikit-learn"
    assert p.stopwords == frozenset(ENGLISH_STOP_WORDS) and len(p.stopwords) == 318
    assert p("The cat sat on the mat because hence") == ["cat", "sat", "mat"]
    # Other languages have no fallback list: one sentence saying how to install NLTK's.
    with pytest.raises(LMInputError, match=r"'french'.*nltk\.downloader stopwords"):
        Preprocessor("treebank", remove_stopwords=True, language="french")


def test_stopwords_source_matches_what_this_machine_has():
    """Without any path tweak the source reflects whether NLTK can find its stopwords corpus here."""
    expected = "scikit-learn"
    for resource in ("corpora/stopwords", "corpora/stopwords.zip"):  # a bare zip is only found by its own name
        try:
            nltk.data.find(resource)
            expected = "nltk"
        except LookupError:
            pass
    assert Preprocessor(remove_stopwords=True).stopwords_source == expected
    assert Preprocessor().stopwords_source is None  # nothing loaded unless asked for


def test_stopword_list_is_part_of_the_settings(shared_nltk, monkeypatch, tmp_path):
    """A different stop-word list (NLTK's vs scikit-learn's) must change the settings, hence the cache key."""
    fresh_stopwords_loader(monkeypatch)
    from_nltk = Preprocessor(remove_stopwords=True)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    fresh_stopwords_loader(monkeypatch)
    from_sklearn = Preprocessor(remove_stopwords=True)
    assert (from_nltk.stopwords_source, from_sklearn.stopwords_source) == ("nltk", "scikit-learn")
    expected = hashlib.sha256("\n".join(sorted(from_sklearn.stopwords)).encode()).hexdigest()[:16]
    assert from_sklearn.settings()["stopwords"] == expected != from_nltk.settings()["stopwords"]
    assert Preprocessor().settings()["stopwords"] is None


@pytest.mark.parametrize(
    "stemmer, expected",
    [
        ("porter", ["run", "run", "easili", "gener", "fairli", "cat", "poni", "relat"]),
        ("snowball", ["run", "run", "easili", "generous", "fair", "cat", "poni", "relat"]),
    ],
)
def test_stemmers_give_their_exact_stems(stemmer, expected):
    """Porter and Snowball differ on 'generously' and 'fairly': proves the right one is wired in."""
    p = Preprocessor("whitespace", stemmer=stemmer)
    assert p("Running runs easily generously fairly cats ponies relational") == expected


def test_lemmatize_without_wordnet_says_how_to_install_it(no_nltk_data):
    """WordNet missing (forced by an empty NLTK path): fail at construction, naming the download command."""
    with pytest.raises(LMInputError, match=r"python -m nltk\.downloader wordnet.*--data\.lemmatize false"):
        Preprocessor(lemmatize=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokenizer="spacy"), "Unknown tokenizer 'spacy'"),
        (dict(stemmer="lancaster"), "Unknown stemmer 'lancaster'"),
        (dict(tokenizer="char", stemmer="porter"), "not with tokenizer='char'"),
        (dict(tokenizer="char", remove_stopwords=True), "not with tokenizer='char'"),
    ],
)
def test_invalid_preprocessor_settings_are_rejected(kwargs, message):
    with pytest.raises(LMInputError, match=message):
        Preprocessor(**kwargs)


def test_detokenize_round_trips_char_text_exactly():
    """Char tokens with <eos> per line give back the text byte for byte, spaces included."""
    p = Preprocessor("char", lowercase=False)
    text = "Hi  there,\nsecond line\n"
    tokens = tokenize_lines(text, p, keep_empty_lines=False)
    assert tokens.count("<eos>") == 2 and tokens[:4] == ["H", "i", " ", " "]
    assert p.detokenize(tokens) == text


def test_detokenize_round_trips_whitespace_and_treebank_lines():
    """A whitespace line comes back with single spaces; Treebank text comes back as written."""
    ws = Preprocessor("whitespace", lowercase=False)
    assert ws.detokenize(ws("the  cat sat .")) == "the cat sat ."
    assert ws.detokenize(["a", "b", "<eos>", "c"]) == "a b\nc"
    tb = Preprocessor("treebank", lowercase=False)
    text = "Don't stop, it's fine.\nOK (yes).\n"
    assert tb.detokenize(tokenize_lines(text, tb, keep_empty_lines=False)) == text


def test_detokenize_whitespace_multiline_has_no_trailing_spaces():
    ws = Preprocessor("whitespace", lowercase=False)
    assert ws.detokenize(tokenize_lines("a b\nc d\n", ws, keep_empty_lines=False)) == "a b\nc d\n"


def test_tokenize_lines_appends_eos_and_optionally_keeps_empty_lines():
    """Each line ends in <eos>; empty lines count only with keep_empty_lines (WikiText's published counts)."""
    p = Preprocessor("whitespace", lowercase=False)
    assert tokenize_lines("a b\n\nc\n", p, keep_empty_lines=False) == ["a", "b", "<eos>", "c", "<eos>"]
    assert tokenize_lines("a b\n\nc\n", p, keep_empty_lines=True) == ["a", "b", "<eos>", "<eos>", "c", "<eos>"]


# --- 2. Vocabulary ------------------------------------------------------------------------------------
COUNTS = Counter({"b": 3, "a": 3, "c": 2, "z": 2, "d": 1, "<eos>": 5, "<unk>": 4})


def test_vocabulary_order_min_freq_and_max_size():
    """Specials first, then frequency descending, ties alphabetical; min_freq and max_size cut the tail."""
    assert Vocabulary.build(COUNTS).itos == ["<unk>", "<eos>", "a", "b", "c", "z", "d"]
    assert Vocabulary.build(COUNTS, min_freq=2).itos == ["<unk>", "<eos>", "a", "b", "c", "z"]
    capped = Vocabulary.build(COUNTS, min_freq=2, max_size=5)
    assert capped.itos == ["<unk>", "<eos>", "a", "b", "c"] and len(capped) == 5
    assert (capped.unk_id, capped.eos_id) == (0, 1)


def test_vocabulary_encodes_unknown_words_as_unk():
    vocab = Vocabulary.build(COUNTS, min_freq=2)
    assert vocab.encode(["a", "d", "z", "<eos>", "never-seen"]) == [2, 0, 5, 1, 0]
    assert vocab.decode([2, 0, 5, 1]) == ["a", "<unk>", "z", "<eos>"]
    array = vocab.encode_array(["b", "q"])
    assert array.dtype == np.int32 and array.tolist() == [3, 0]


@pytest.mark.parametrize("kwargs, message", [(dict(min_freq=0), "min_freq"), (dict(max_size=2), "max_vocab_size")])
def test_vocabulary_rejects_bad_limits(kwargs, message):
    with pytest.raises(LMInputError, match=message):
        Vocabulary.build(COUNTS, **kwargs)


def test_vocabulary_saves_json_and_loads_it_back(tmp_path):
    """A vocabulary file is plain JSON (safe to open, never a pickle) and round-trips exactly."""
    vocab = Vocabulary.build(Counter({"café": 2, "naïve": 1, "x": 1}))
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"itos": ["<unk>", "<eos>", "café", "naïve", "x"]}
    assert "café" in path.read_text(encoding="utf-8")  # stored as text, not \u escapes
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(path.read_bytes())
    assert Vocabulary.load(path) == vocab
    assert cache_entries(tmp_path) == ["vocab.json"]  # the atomic write left no temporary file


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\x80\x04\x95 pickled",
        pickle.dumps({"itos": ["<unk>", "<eos>"]}),
        b'{"itos": ["a", "b"]}',
        b'["<unk>", "<eos>"]',
        b"{}",
    ],
    ids=["truncated-json", "binary", "pickle", "no-specials", "list", "no-itos"],
)
def test_corrupt_vocabulary_file_is_an_input_error_naming_the_file(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_bytes(content)
    with pytest.raises(LMInputError, match=rf"{path}.*not a readable vocabulary file.*delete it"):
        Vocabulary.load(path)


def test_missing_vocabulary_file_is_an_input_error(tmp_path):
    with pytest.raises(LMInputError, match="nothere.json"):
        Vocabulary.load(tmp_path / "nothere.json")


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
    windows = [(x.tolist(), y.tolist()) for x, y in data]
    assert windows == [
        ([[0, 1], [6, 7]], [[1, 2], [7, 8]]),
        ([[2, 3], [8, 9]], [[3, 4], [9, 10]]),
        ([[4], [10]], [[5], [11]]),
    ]
    x, y = next(iter(data))
    assert x.dtype == y.dtype == torch.long  # what nn.Embedding and cross_entropy want
    assert len(data) == 3
    assert data.num_tokens == 10 == sum(y.numel() for _, y in data)


@pytest.mark.parametrize("length, batch_size, bptt", [(13, 2, 2), (14, 2, 3), (30, 3, 4), (31, 1, 5), (6, 2, 2), (100, 4, 7)])
def test_len_and_num_tokens_equal_what_iteration_yields(length, batch_size, bptt):
    data = StreamWindows(np.arange(length), batch_size, bptt)
    windows = list(data)
    assert len(data) == len(windows) == math.ceil((length // batch_size - 1) / bptt)
    assert data.num_tokens == sum(y.numel() for _, y in windows) == batch_size * (length // batch_size - 1)
    assert all(x.shape[1] <= bptt for x, _ in windows)


def test_ddp_ranks_get_disjoint_contiguous_rows():
    """world_size=2, batch_size=2: 4 streams; rank 0 takes rows 0-1, rank 1 rows 2-3; same number of windows."""
    ids = np.arange(26)
    rank0 = StreamWindows(ids, batch_size=2, bptt=2, rank=0, world_size=2)
    rank1 = StreamWindows(ids, batch_size=2, bptt=2, rank=1, world_size=2)
    assert rank0.streams.tolist() == [list(range(0, 6)), list(range(6, 12))]
    assert rank1.streams.tolist() == [list(range(12, 18)), list(range(18, 24))]
    assert set(rank0.streams.flatten().tolist()).isdisjoint(rank1.streams.flatten().tolist())
    assert len(rank0) == len(rank1) == 3
    assert next(iter(rank1))[0].tolist() == [[12, 13], [18, 19]]


@pytest.mark.parametrize("length, world_size", [(5, 1), (11, 2)])
def test_split_shorter_than_one_window_is_an_input_error(length, world_size):
    needed = 2 * world_size * 3
    with pytest.raises(
        LMInputError,
        match=rf"valid split has {length} tokens.*batch_size x world_size x \(bptt \+ 1\) = {needed}.*--data.batch_size or --data.bptt",
    ):
        StreamWindows(np.arange(length), batch_size=2, bptt=2, world_size=world_size, split="valid")
    StreamWindows(np.arange(needed), batch_size=2, bptt=2, world_size=world_size)  # exactly one window is enough


def test_datamodule_setup_streams_the_cached_ids(corpus_dir, tmp_path):
    """setup('fit') builds train (batch_size) and valid (eval_batch_size) streams from the cached ids only."""
    dm = make_dm(corpus_dir, tmp_path / "cache", batch_size=2, eval_batch_size=1, bptt=2)
    dm.setup("fit")
    assert sorted(dm.datasets) == ["train", "valid"]
    batches = [(x.tolist(), y.tolist()) for x, y in dm.train_dataloader()]
    # TRAIN_IDS in two rows of 5: [2 4 3 7 2] and [6 1 2 5 3]; the 11th id is dropped.
    assert batches == [([[2, 4], [6, 1]], [[4, 3], [1, 2]]), ([[3, 7], [2, 5]], [[7, 2], [5, 3]])]
    assert [x.tolist() for x, _ in dm.val_dataloader()] == [[[2, 4]], [[0]]]


# --- 5. Deterministic splits --------------------------------------------------------------------------
def blocks_of_split(text: str) -> list[str]:
    """Paragraphs of a split (the embedded corpus rejoins its paragraphs with a blank line)."""
    return text.split("\n\n")


def nonblank_lines(text: str) -> Counter:
    return Counter(line for line in text.splitlines() if line.strip())


def test_embedded_corpus_splits_are_deterministic_and_partition_the_text():
    """Same splits every call; every distinct paragraph of the source lands in exactly one split."""
    from pydoc_data.topics import topics

    from lm_lightning.data.sources import paragraphs_of

    first, second = load_corpus("embedded"), load_corpus("embedded")
    assert first == second and first.content_hash() == second.content_hash()
    assert all(first[s].strip() for s in ("train", "valid", "test"))
    source = {p for k in topics for p in paragraphs_of(topics[k])}
    held_out = set(blocks_of_split(first.valid)) | set(blocks_of_split(first.test))
    # Repeated paragraphs ("See also:" ...) are kept once, so no held-out paragraph also appears in train.
    assert held_out.isdisjoint(blocks_of_split(first.train))
    assert held_out | set(blocks_of_split(first.train)) <= source
    share = [len(first[s]) / sum(len(first[t]) for t in ("train", "valid", "test")) for s in ("valid", "test")]
    assert all(0.03 < f < 0.08 for f in share), share  # about 1 block in 20 each


def test_split_documents_deals_blocks_in_proportion():
    """A block goes to a held-out split once that split is half a block behind its share (ties: valid first)."""
    blocks = [f"b{i}" for i in range(40)]
    train, valid, test = split_documents(blocks, 0.05, 0.05)
    # valid is 0.5 behind at block 9 (10 x 0.05) and 29; test reaches 0.55 one block later.
    assert valid.split("\n") == ["b9", "b29"]
    assert test.split("\n") == ["b10", "b30"]
    assert train.split("\n") == [b for b in blocks if b not in {"b9", "b10", "b29", "b30"}]
    train, valid, test = split_documents(blocks, 0.25, 0.2)
    # Exact shares (10 and 8 of 40) even where the two splits compete for the same block.
    assert valid.split("\n") == [f"b{i}" for i in (1, 5, 9, 13, 18, 21, 25, 29, 33, 38)]
    assert test.split("\n") == [f"b{i}" for i in (2, 7, 12, 17, 22, 27, 32, 37)]
    _, valid, test = split_documents(blocks, 0.45, 0.45)  # the old round-robin left test empty here
    assert len(valid.split("\n")) == 18 and len(test.split("\n")) == 18


def test_single_text_file_is_split_by_paragraph_deterministically(tmp_path):
    """45 unique paragraphs: paragraphs stay whole, none is shared between train and valid/test."""
    paragraphs = [f"Paragraph {i} first line.\nParagraph {i} second line." for i in range(45)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus == load_corpus(str(path)) and corpus.name == "book"
    assert corpus.valid == "\n\n".join(paragraphs[i] for i in (9, 29))  # paragraphs stay paragraphs
    assert corpus.test.rstrip("\n") == "\n\n".join(paragraphs[i] for i in (10, 30))
    train_lines = {line for line in corpus.train.splitlines() if line}
    for held_out in (corpus.valid, corpus.test):
        assert train_lines.isdisjoint(line for line in held_out.splitlines() if line)


def test_short_text_file_is_split_by_line(tmp_path):
    """Fewer than 40 paragraphs: lines become the blocks instead."""
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(40)), encoding="utf-8")
    corpus = load_corpus(str(path), valid_fraction=0.1, test_fraction=0.1)
    # valid is half a block behind at line 4 (5 x 0.1), test one line later; then every 10 lines.
    assert corpus.valid.splitlines() == [f"line {i}" for i in range(4, 40, 10)]
    assert corpus.test.splitlines() == [f"line {i}" for i in range(5, 40, 10)]
    assert len(corpus.train.splitlines()) == 32


@pytest.mark.parametrize("valid, test", [(0, 0.05), (0.5, 0.05), (-0.1, 0.05), (0.05, 0.0), (0.05, 0.6), (0.05, 1.0)])
def test_fractions_outside_zero_to_half_are_rejected(valid, test):
    bad = "valid_fraction" if not 0 < valid < 0.5 else "test_fraction"
    with pytest.raises(LMInputError, match=rf"{bad} must be in \(0, 0.5\)"):
        split_documents([f"b{i}" for i in range(40)], valid, test)
    with pytest.raises(LMInputError, match=bad):
        load_corpus("embedded", valid_fraction=valid, test_fraction=test)


def test_too_few_blocks_to_split_is_an_input_error():
    with pytest.raises(LMInputError, match="only 5 paragraphs or lines"):
        split_documents([f"b{i}" for i in range(5)], 0.05, 0.05)


# --- 6. Sources and bad input -------------------------------------------------------------------------
def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(LMInputError, match=rf"{missing} does not exist"):
        load_corpus(str(missing))
    with pytest.raises(LMInputError, match=rf"{missing} does not exist"):
        _ = make_dm(missing, tmp_path / "cache").vocab


@pytest.mark.parametrize("content", [b"", b"  \n\n\t\n"], ids=["empty", "blank"])
def test_empty_file_names_the_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(LMInputError, match=rf"{path} is empty"):
        load_corpus(str(path))


def test_non_utf8_file_names_the_file_byte_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"\xff\xfe" + "caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(LMInputError, match=rf"{path} is not UTF-8 text \(byte 0xff at offset 0\).*iconv"):
        load_corpus(str(path))
    folder = write_corpus(tmp_path / "corpus", TRAIN, VALID, TEST)
    (folder / "valid.txt").write_bytes(b"ok\n\xe9t\xe9\n")
    with pytest.raises(LMInputError, match=rf"{folder / 'valid.txt'} is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        load_corpus(str(folder))


def test_unknown_source_name_lists_the_valid_ones():
    with pytest.raises(LMInputError, match=r"Unknown data source 'notacorpus': use embedded, wikitext-2, ptb, nltk:<corpus>"):
        load_corpus("notacorpus")


def test_folder_without_valid_txt_names_the_folder_and_the_file(tmp_path):
    folder = write_corpus(tmp_path / "partial", TRAIN, VALID, TEST)
    (folder / "valid.txt").unlink()
    with pytest.raises(LMInputError, match=rf"{folder} has no valid.txt: a corpus folder needs"):
        load_corpus(str(folder))


def test_folder_corpus_reads_the_three_files(corpus_dir):
    corpus = load_corpus(str(corpus_dir))
    assert (corpus.name, corpus.train, corpus.valid, corpus.test) == ("tiny", TRAIN, VALID, TEST)


def test_nltk_name_that_is_no_corpus_reader():
    with pytest.raises(LMInputError, match=r"nltk:notacorpus is not an NLTK corpus reader"):
        load_corpus("nltk:notacorpus")


def test_nltk_corpus_not_installed_is_an_input_error(no_nltk_data, monkeypatch):
    monkeypatch.setattr(
        nltk.corpus, "gutenberg", LazyCorpusLoader("gutenberg", PlaintextCorpusReader, r"(?!\.).*\.txt", encoding="latin1")
    )
    with pytest.raises(LMInputError, match=r"'gutenberg' corpus is not installed.*nltk\.downloader gutenberg"):
        load_corpus("nltk:gutenberg")


def test_nltk_brown_gives_three_nonempty_splits(shared_nltk):
    """Brown's 500 files are dealt into splits: about 1 in 20 each to valid and test."""
    corpus = load_corpus("nltk:brown")
    assert corpus.name == "nltk-brown"
    sizes = {s: len(corpus[s].split()) for s in ("train", "valid", "test")}
    assert all(sizes.values()), sizes
    assert 0.03 < sizes["valid"] / sum(sizes.values()) < 0.08 and 0.03 < sizes["test"] / sum(sizes.values()) < 0.08
    assert corpus.train.splitlines()[0].split()[:3] == ["The", "Fulton", "County"]  # ca01, the first file


# --- 7. Downloads and named corpora -------------------------------------------------------------------
@pytest.fixture
def remote(tmp_path) -> Path:
    """A folder standing in for a web server, reached through file:// URLs."""
    return write_corpus(tmp_path / "remote", TRAIN, VALID, TEST)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_with_matching_sha256_writes_the_file(remote, tmp_path):
    source = remote / "train.txt"
    target = tmp_path / "got" / "train.txt"
    download(source.as_uri(), target, sha256_of(source))
    assert target.read_bytes() == source.read_bytes()
    assert cache_entries(target.parent) == ["train.txt"]


def test_download_with_wrong_sha256_leaves_no_file(remote, tmp_path):
    source = remote / "train.txt"
    target = tmp_path / "got" / "train.txt"
    with pytest.raises(LMInputError, match=rf"{source.as_uri()} has sha256 {sha256_of(source)}, expected 0{{64}}"):
        download(source.as_uri(), target, "0" * 64)
    assert not target.exists()
    assert cache_entries(target.parent) == []  # no temporary file left either


def test_named_corpus_downloads_missing_files(remote, tmp_path, monkeypatch):
    """A named corpus absent from data_dir is fetched (here from file://), verified, then read."""
    spec = NamedDataset(
        url=remote.as_uri() + "/{split}.txt", sha256={s: sha256_of(remote / f"{s}.txt") for s in ("train", "valid", "test")}
    )
    monkeypatch.setitem(NAMED_DATASETS, "tiny-remote", spec)
    data_dir = tmp_path / "data"
    corpus = load_corpus("tiny-remote", data_dir=str(data_dir))
    assert (corpus.train, corpus.valid, corpus.test) == (TRAIN, VALID, TEST)
    assert cache_entries(data_dir) == ["test.txt", "train.txt", "valid.txt"]


def test_named_corpus_that_cannot_be_downloaded_names_the_missing_file(tmp_path, monkeypatch):
    spec = NamedDataset(
        url=(tmp_path / "offline").as_uri() + "/{split}.txt", sha256={s: "0" * 64 for s in ("train", "valid", "test")}
    )
    monkeypatch.setitem(NAMED_DATASETS, "unreachable", spec)
    data_dir = tmp_path / "data"
    with pytest.raises(LMInputError, match=rf"{data_dir / 'train.txt'} is missing and could not be downloaded.*--data.data_dir"):
        named_corpus("unreachable", data_dir)
    assert cache_entries(data_dir) == []


@pytest.mark.parametrize("name, folder", [("ptb", SHARED_PTB), ("wikitext-2", SHARED_WT2)])
def test_registered_sha256_matches_the_shared_copies(name, folder):
    """The checksums a download is verified against are those of the real files."""
    if folder is None:
        pytest.skip(f"../shared/data/{name} is not present")
    assert {s: sha256_of(folder / f"{s}.txt") for s in ("train", "valid", "test")} == NAMED_DATASETS[name].sha256


@pytest.mark.skipif(SHARED_PTB is None, reason="../shared/data/ptb is not present")
def test_ptb_from_data_dir_has_the_published_token_counts(tmp_path):
    """Read from data_dir (no download): 929,589 train tokens, and the pipeline reproduces the 10k vocabulary."""
    corpus = named_corpus("ptb", data_dir=SHARED_PTB)
    assert sum(len(line.split()) + 1 for line in corpus.train.splitlines()) == 929_589
    dm = TokenDataModule(
        source="ptb",
        data_dir=str(SHARED_PTB),
        tokenizer="whitespace",
        lowercase=False,
        min_freq=1,
        cache_dir=str(tmp_path / "cache"),
    )
    assert dm.vocab_size == 10_000
    assert {s: len(dm.ids(s)) for s in ("train", "valid", "test")} == {"train": 929_589, "valid": 73_760, "test": 82_430}
    assert dm.vocab.stoi["<unk>"] == 0  # PTB's own <unk> tokens map onto ours


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
