"""Where text comes from: deterministic splits, folders, files, NLTK corpora, downloads checked by SHA-256, bad input.

The corpora kept in ``../shared`` (NLTK data, PTB, WikiText-2) are used when present; the tests that need them are
skipped, with the reason, otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import multiprocessing
import os
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import nltk
import nltk.redos
import pytest
from conftest import (
    SHARED_PTB,
    SHARED_WT2,
    TEST,
    TRAIN,
    VALID,
    cache_entries,
    make_dm,
    write_corpus,
)
from nltk.corpus.reader import PlaintextCorpusReader
from nltk.corpus.util import LazyCorpusLoader

import lm_lightning.data.sources as sources
from lm_lightning.data import Preprocessor, TokenDataModule, load_corpus
from lm_lightning.data.preprocessing import MAX_CHUNK_CHARS
from lm_lightning.data.sources import NAMED_DATASETS, NamedDataset, download, named_corpus
from lm_lightning.data.splits import split_documents
from lm_lightning.errors import LMInputError


# --- 5. Deterministic splits --------------------------------------------------------------------------
def blocks_of_split(text: str) -> list[str]:
    """Paragraphs of a split (the embedded corpus rejoins its paragraphs with a blank line)."""
    return text.split("\n\n")


def nonblank_lines(text: str) -> Counter:
    return Counter(line for line in text.splitlines() if line.strip())


def test_embedded_corpus_splits_are_deterministic_and_partition_the_text():
    """Same splits every call; every distinct paragraph of the source lands in exactly one split."""
    from pydoc_data.topics import topics

    from lm_lightning.data.splits import paragraphs_of

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
    with pytest.raises(LMInputError, match=rf"{folder} has no valid.txt: a corpus folder given as --data.source needs"):
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


# --- 8. Files that are not text, too large, unreadable; lines too long (issue 8) ------------------------
def test_device_or_pipe_is_refused_before_reading(tmp_path):
    """/dev/zero would be read until memory runs out, and opening a pipe blocks: both are refused by their type."""
    with pytest.raises(
        LMInputError, match=r"^/dev/zero is not a regular file \(a device, pipe or socket\): give a text file as --data.source\.$"
    ):
        load_corpus("/dev/zero")
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    with pytest.raises(LMInputError, match=rf"^{fifo} is not a regular file"):
        load_corpus(str(fifo))
    folder = write_corpus(tmp_path / "corpus", TRAIN, VALID, TEST)
    (folder / "test.txt").unlink()
    (folder / "test.txt").symlink_to("/dev/zero")
    with pytest.raises(LMInputError, match=rf"^{folder / 'test.txt'} is not a regular file"):
        load_corpus(str(folder))


def test_file_over_the_size_limit_is_refused_without_reading_it(tmp_path, monkeypatch):
    """A sparse file of 1 GiB + 1 byte (no disk, no reading) is over the default limit; LM_LIGHTNING_MAX_TEXT_GB sets it."""
    big = tmp_path / "big.txt"
    big.touch()
    os.truncate(big, 2**30 + 1)
    monkeypatch.delenv("LM_LIGHTNING_MAX_TEXT_GB", raising=False)
    with pytest.raises(
        LMInputError,
        match=rf"^{big} is larger than 1 GiB, the limit on one text file: split it .* raise LM_LIGHTNING_MAX_TEXT_GB if",
    ):
        load_corpus(str(big))
    small = tmp_path / "small.txt"
    small.write_text("word " * 400)  # 2,000 bytes
    monkeypatch.setenv("LM_LIGHTNING_MAX_TEXT_GB", str(2000 / 2**30))
    assert sources.read_text(small) == "word " * 400
    monkeypatch.setenv("LM_LIGHTNING_MAX_TEXT_GB", str(1999 / 2**30))
    with pytest.raises(LMInputError, match=rf"^{small} is larger than 1,999 bytes, the limit on one text file"):
        sources.read_text(small)
    monkeypatch.setenv("LM_LIGHTNING_MAX_TEXT_GB", "lots")
    with pytest.raises(LMInputError, match=r"^LM_LIGHTNING_MAX_TEXT_GB='lots' is not a number: set it to a size in GiB"):
        load_corpus(str(big))


def test_file_that_grows_past_the_limit_while_read_is_refused(tmp_path, monkeypatch):
    """The read is bounded too (a growing file, or a /proc file that reports size 0): at most limit + 1 bytes."""
    path = tmp_path / "growing.txt"
    path.write_text("word " * 100)
    monkeypatch.setenv("LM_LIGHTNING_MAX_TEXT_GB", str(300 / 2**30))
    real_stat = Path.stat
    monkeypatch.setattr(
        Path, "stat", lambda self, **kw: os.stat_result((*real_stat(self, **kw)[:6], 0, *real_stat(self, **kw)[7:]))
    )
    with pytest.raises(LMInputError, match=rf"^{path} is larger than 300 bytes"):
        load_corpus(str(path))


def test_unreadable_file_is_one_sentence(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("some text\n" * 50)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file whatever its mode: fail the open the way the kernel would for a user

        def denied(file, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))

        monkeypatch.setattr(sources, "open", denied, raising=False)
    with pytest.raises(
        LMInputError,
        match=rf"^{path} cannot be read \(Permission denied\): make it readable \(chmod a\+r\) or give another --data.source\.$",
    ):
        load_corpus(str(path))


@pytest.mark.parametrize(
    "content, message",
    [
        (bytes(range(256)) * 8, "is binary, not text (a NUL byte at offset 0)"),
        (b"\x7fELF\x02\x01\x01" + b"\x00" * 9, "is binary, not text (a NUL byte at offset 7)"),
        (
            "some text\n".encode("utf-16"),
            "is binary, not text (a NUL byte at offset 3): give a UTF-8 text file as --data.source (UTF-16",
        ),
        (bytes(range(128, 256)) * 8, "is not UTF-8 text (byte 0x80 at offset 0)"),
    ],
    ids=["random-bytes", "elf-header", "utf-16", "high-bytes"],
)
def test_binary_file_is_one_sentence(tmp_path, content, message):
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    with pytest.raises(LMInputError) as info:
        load_corpus(str(path))
    assert str(info.value).startswith(f"{path} {message}"), str(info.value)


def test_a_very_long_line_is_tokenized_in_chunks_within_nltks_time_limit(monkeypatch):
    """NLTK gives each regular expression 5 s; one 50 MB line exceeded it (or not) depending on machine load. Lines over
    MAX_CHUNK_CHARS are cut at whitespace: here a 1 MB line passes with the limit 50x tighter (0.1 s), and the same
    line at once trips even a 1 ms limit, so the limit is live in this test."""
    words = ["the", "cat", "sat", "on", "a", "mat", "dog"]
    line = " ".join(words[i * 7919 % 7] for i in range(300_000))
    assert len(line) > 16 * MAX_CHUNK_CHARS
    monkeypatch.setattr(nltk.redos, "DEFAULT_TIMEOUT", 0.001)
    with pytest.raises(TimeoutError):
        nltk.tokenize.NLTKWordTokenizer().tokenize(line)
    monkeypatch.setattr(nltk.redos, "DEFAULT_TIMEOUT", 0.1)
    assert Preprocessor("treebank")(line) == line.split()
    assert Preprocessor("treebank")("Short lines don't change.") == ["short", "lines", "do", "n't", "change", "."]


def test_chunks_cut_at_whitespace_and_inside_overlong_words():
    from lm_lightning.data.preprocessing import chunks

    assert list(chunks("aaa bbb ccc", 5)) == ["aaa", " bbb", " ccc"]
    assert list(chunks("abcdefghijkl mn", 5)) == ["abcde", "fghij", "kl mn"]
    assert "".join(chunks("x\ty " * 1000, 7)) == "x\ty " * 1000


# --- 9. Downloads: size cap, deadline, failures, kills (issue 8) ----------------------------------------
class FakeResponse:
    """What urlopen returns, serving ``chunks`` through read1 (``delay`` seconds each), as a slow or hostile server."""

    def __init__(self, chunks, delay: float = 0.0, error: Exception | None = None) -> None:
        self.chunks, self.delay, self.error = list(chunks), delay, error

    def read1(self, size: int) -> bytes:
        time.sleep(self.delay)
        if self.error is not None and not self.chunks:
            raise self.error
        return self.chunks.pop(0) if self.chunks else b""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def serve(monkeypatch, make_response) -> list[str]:
    """Replace urllib's urlopen; returns the list of URLs asked for."""
    asked: list[str] = []

    def urlopen(url, timeout=None):
        asked.append(url)
        return make_response(url)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


@pytest.fixture
def fake_corpus(monkeypatch) -> str:
    """A named corpus at http://example.invalid whose files are TRAIN, VALID and TEST."""
    texts = {"train": TRAIN, "valid": VALID, "test": TEST}
    spec = NamedDataset(
        url="http://example.invalid/{split}.txt",
        sha256={s: hashlib.sha256(t.encode()).hexdigest() for s, t in texts.items()},
    )
    monkeypatch.setitem(NAMED_DATASETS, "fake", spec)
    return "fake"


def test_a_download_onto_a_full_disk_is_one_sentence_and_leaves_no_file(fake_corpus, small_disk, monkeypatch):
    """The named corpus is fetched into $LM_LIGHTNING_DATA on a 64 KiB disk; its 1 MiB train.txt cannot fit."""
    data = small_disk(64)
    monkeypatch.setenv("LM_LIGHTNING_DATA", str(data))
    serve(monkeypatch, lambda url: FakeResponse([b"x" * 65536] * 16))
    with pytest.raises(LMInputError, match=r"^The disk holding .* is full, so fake's train.txt was not downloaded: .*LM_LIGHTNING_DATA"):
        load_corpus(fake_corpus)
    assert [p.name for p in (data / fake_corpus).iterdir() if not p.name.endswith(".lock")] == []


def test_download_over_the_size_cap_stops_and_leaves_no_file(tmp_path, monkeypatch):
    serve(monkeypatch, lambda url: FakeResponse([b"x" * 65536] * 100))
    target = tmp_path / "got" / "train.txt"
    with pytest.raises(
        LMInputError,
        match=r"^http://h/t sent more than 100,000 bytes, more than train.txt can be: download .* --data.data_dir\.$",
    ):
        download("http://h/t", target, "0" * 64, max_bytes=100_000)
    assert cache_entries(target.parent) == []


def test_download_that_trickles_stops_at_the_deadline(tmp_path, monkeypatch, fake_corpus):
    """One byte every 20 ms never trips a socket timeout; the corpus deadline (here 0.3 s) stops it."""
    serve(monkeypatch, lambda url: FakeResponse([b"x"] * 10_000, delay=0.02))
    monkeypatch.setattr(sources, "DOWNLOAD_SECONDS", 0.3)
    data_dir = tmp_path / "data"
    start = time.monotonic()
    with pytest.raises(
        LMInputError,
        match=r"^Downloading http://example.invalid/train.txt did not finish in time \(the limit is 0.3 s for a corpus\)",
    ):
        named_corpus(fake_corpus, data_dir)
    assert time.monotonic() - start < 2.0
    assert cache_entries(data_dir) == []


@pytest.mark.parametrize(
    "failure, message",
    [
        (lambda url: (_ for _ in ()).throw(urllib.error.URLError("no network")), "<urlopen error no network>"),
        (lambda url: (_ for _ in ()).throw(TimeoutError("timed out")), "timed out"),
        (
            lambda url: FakeResponse([b"the cat"], error=http.client.IncompleteRead(b"the cat", 100)),
            "IncompleteRead(7 bytes read, 100 more expected)",
        ),
        (
            lambda url: FakeResponse([b"the cat"], error=ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")),
            "Connection reset by peer",
        ),
    ],
    ids=["url-error", "timeout", "incomplete-read", "connection-reset"],
)
def test_download_failure_is_one_sentence_and_leaves_no_file(tmp_path, monkeypatch, fake_corpus, failure, message):
    serve(monkeypatch, failure)
    data_dir = tmp_path / "data"
    with pytest.raises(LMInputError) as info:
        named_corpus(fake_corpus, data_dir)
    expected = f"{data_dir / 'train.txt'} is missing and could not be downloaded ("
    assert str(info.value).startswith(expected) and message in str(info.value), str(info.value)
    assert str(info.value).endswith("put fake's train.txt, valid.txt and test.txt in a folder and pass it as --data.data_dir.")
    assert cache_entries(data_dir) == []


def test_download_with_wrong_sha256_from_a_server(tmp_path, monkeypatch, fake_corpus):
    serve(monkeypatch, lambda url: FakeResponse([b"not the corpus\n"]))
    data_dir = tmp_path / "data"
    with pytest.raises(
        LMInputError, match=r"^The file downloaded from http://example.invalid/train.txt has sha256 [0-9a-f]{64}, expected"
    ):
        named_corpus(fake_corpus, data_dir)
    assert cache_entries(data_dir) == []


def _download_and_die(name: str, data_dir: Path) -> None:
    def urlopen(url, timeout=None):
        class Dying(FakeResponse):
            def read1(self, size: int) -> bytes:
                if not self.chunks:
                    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-download, after the first bytes were written
                return super().read1(size)

        return Dying([TRAIN.encode()[:5]])

    urllib.request.urlopen = urlopen
    named_corpus(name, data_dir)


def test_a_killed_download_leaves_a_temporary_file_that_the_next_start_removes(tmp_path, monkeypatch, fake_corpus):
    data_dir = tmp_path / "data"
    process = multiprocessing.get_context("fork").Process(target=_download_and_die, args=(fake_corpus, data_dir))
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL
    left = cache_entries(data_dir)
    assert sorted(name.rsplit(".", 1)[1] for name in left) == ["lock", "tmp"] and left[1].startswith(".train.txt."), left
    asked = serve(monkeypatch, lambda url: FakeResponse([{"train": TRAIN, "valid": VALID, "test": TEST}[url[23:-4]].encode()]))
    corpus = named_corpus(fake_corpus, data_dir)
    assert (corpus.train, corpus.valid, corpus.test) == (TRAIN, VALID, TEST)
    assert len(asked) == 3 and cache_entries(data_dir) == ["test.txt", "train.txt", "valid.txt"]
