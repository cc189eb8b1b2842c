"""NLTK text preprocessing: tokenization and optional normalization, one line at a time.

Only parts of NLTK that need no downloaded model are used by default, so everything runs offline:

* ``treebank``: NLTK's improved Treebank word tokenizer (``NLTKWordTokenizer``, what ``word_tokenize`` runs
  after its Punkt sentence splitter). Applied per line, it needs no Punkt model. A line longer than
  ``MAX_CHUNK_CHARS`` is tokenized in pieces cut at whitespace: NLTK runs each regular expression under a 5-second
  limit (``nltk.redos``), which a 50 MB line exceeds or not depending on machine load (issue 8).
* ``whitespace``: ``str.split`` for corpora that are already tokenized (WikiText, Penn Treebank).
* ``char``: one token per character, for text without spaces between words (Chinese, Japanese, Thai).

Stop-word removal uses NLTK's list when its ``stopwords`` corpus is installed, otherwise scikit-learn's
English list; stemming (Porter, Snowball) needs no data; WordNet lemmatization needs NLTK's ``wordnet`` corpus.
The defaults suit language modelling: nothing is removed or rewritten except lowercasing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Literal, Optional

from lm_lightning.data.vocabulary import EOS
from lm_lightning.errors import LMInputError

log = logging.getLogger(__name__)

Tokenizer = Literal["treebank", "whitespace", "char"]
Stemmer = Literal["porter", "snowball"]

# 64 Ki characters take NLTK's treebank tokenizer about 0.1 s, far inside its 5 s limit per regular expression even on
# a loaded machine; only lines longer than this (no natural text) are cut, so ordinary corpora tokenize as before.
MAX_CHUNK_CHARS = 1 << 16


def chunks(line: str, size: int = MAX_CHUNK_CHARS) -> Iterator[str]:
    """``line`` in pieces of at most ``size`` characters, cut at the last space or tab before the limit (or at the
    limit, inside a word longer than that)."""
    start = 0
    while len(line) - start > size:
        cut = max(line.rfind(" ", start, start + size), line.rfind("\t", start, start + size))
        cut = cut if cut > start else start + size
        yield line[start:cut]
        start = cut
    yield line[start:]


def split_chars(line: str) -> list[str]:
    """One token per character. Inner spaces stay tokens so generated text can be read back; line ends are dropped
    (they become ``<eos>``)."""
    return list(line.strip("\r\n"))


def split_treebank(tokenize: Callable[[str], list[str]], line: str) -> list[str]:
    """``tokenize(line)``, a line longer than ``MAX_CHUNK_CHARS`` in pieces (see the module docstring)."""
    if len(line) <= MAX_CHUNK_CHARS:
        return tokenize(line)
    return [token for piece in chunks(line) for token in tokenize(piece)]


def load_stopwords(language: str = "english") -> tuple[frozenset[str], str]:
    """Return the stop-word set and where it came from ("nltk" or "scikit-learn")."""
    try:
        from nltk.corpus import stopwords

        return frozenset(stopwords.words(language)), "nltk"
    except OSError:  # NLTK has the corpus but no list for this language
        raise LMInputError(f"NLTK has no stop-word list for {language!r}: use one of stopwords.fileids().") from None
    except LookupError:
        if language != "english":
            raise LMInputError(
                f"Stop words for {language!r} need NLTK's stopwords corpus, which is not installed: run "
                "`python -m nltk.downloader stopwords` (or point NLTK_DATA at a folder that has it)."
            ) from None
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        return frozenset(ENGLISH_STOP_WORDS), "scikit-learn"


def _wordnet_lemmatizer() -> Callable[[str], str]:
    import nltk
    from nltk.stem import WordNetLemmatizer

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        try:
            nltk.data.find("corpora/wordnet.zip")
        except LookupError:
            raise LMInputError(
                "lemmatize=True needs NLTK's WordNet data, which is not installed: run "
                "`python -m nltk.downloader wordnet` (or point NLTK_DATA at a folder that has it), "
                "or set --data.lemmatize false."
            ) from None
    return WordNetLemmatizer().lemmatize


class Preprocessor:
    """Turns one line of raw text into a list of tokens, and tokens back into readable text.

    Args:
        tokenizer: ``treebank`` (English words and punctuation), ``whitespace`` (pre-tokenized corpora) or
            ``char`` (text without spaces between words).
        lowercase: Lowercase before tokenizing.
        remove_stopwords: Drop stop words (NLTK's list if installed, else scikit-learn's English list).
        stemmer: ``porter`` or ``snowball`` stemming of each token; ``None`` keeps words whole.
        lemmatize: WordNet lemmatization (needs NLTK's ``wordnet`` data).
        language: Language for the stop-word list and the Snowball stemmer.
    """

    def __init__(
        self,
        tokenizer: Tokenizer = "treebank",
        lowercase: bool = True,
        remove_stopwords: bool = False,
        stemmer: Optional[Stemmer] = None,
        lemmatize: bool = False,
        language: str = "english",
    ) -> None:
        if tokenizer not in ("treebank", "whitespace", "char"):
            raise LMInputError(f"Unknown tokenizer {tokenizer!r}: use one of treebank, whitespace, char.")
        if stemmer not in (None, "porter", "snowball"):
            raise LMInputError(f"Unknown stemmer {stemmer!r}: use porter, snowball, or leave it unset.")
        if tokenizer == "char" and (remove_stopwords or stemmer or lemmatize):
            raise LMInputError("Stop words, stemming and lemmatization act on words: not with tokenizer='char'.")
        self.tokenizer = tokenizer
        self.lowercase = lowercase
        self.remove_stopwords = remove_stopwords
        self.stemmer = stemmer
        self.lemmatize = lemmatize
        self.language = language

        self.stopwords: frozenset[str] = frozenset()
        self.stopwords_source: Optional[str] = None
        if remove_stopwords:
            self.stopwords, self.stopwords_source = load_stopwords(language)
            log.info("Stop words: %d from %s", len(self.stopwords), self.stopwords_source)
        self._lemmatize = _wordnet_lemmatizer() if lemmatize else None
        self._stem: Optional[Callable[[str], str]] = None
        if stemmer == "porter":
            from nltk.stem import PorterStemmer

            self._stem = PorterStemmer().stem
        elif stemmer == "snowball":
            from nltk.stem import SnowballStemmer

            if language not in SnowballStemmer.languages:
                raise LMInputError(
                    f"The Snowball stemmer has no {language!r}: use one of {', '.join(SnowballStemmer.languages)}."
                )
            self._stem = SnowballStemmer(language).stem
        self._split = self._make_splitter()

    def _make_splitter(self) -> Callable[[str], list[str]]:
        # Module-level functions, no lambdas: ``--trainer.strategy ddp_spawn`` pickles the data module, and with it
        # this preprocessor, into every rank's process.
        if self.tokenizer == "whitespace":
            return str.split
        if self.tokenizer == "char":
            return split_chars
        from nltk.tokenize import NLTKWordTokenizer

        return functools.partial(split_treebank, NLTKWordTokenizer().tokenize)

    def arguments(self) -> dict:
        """The constructor's arguments: ``Preprocessor(**p.arguments())`` tokenizes as ``p`` does (an export keeps them)."""
        names = ("tokenizer", "lowercase", "remove_stopwords", "stemmer", "lemmatize", "language")
        return {name: getattr(self, name) for name in names}

    def settings(self) -> dict:
        """Everything that changes the tokens, for the cache key (the stop-word list is hashed in)."""
        words = "\n".join(sorted(self.stopwords)).encode()
        return {
            "tokenizer": self.tokenizer,
            "lowercase": self.lowercase,
            "stopwords": hashlib.sha256(words).hexdigest()[:16] if self.remove_stopwords else None,
            "stemmer": self.stemmer,
            "lemmatize": self.lemmatize,
            "language": self.language,
        }

    def __call__(self, line: str) -> list[str]:
        if self.lowercase:
            line = line.lower()
        tokens = self._split(line)
        if self.stopwords:
            tokens = [t for t in tokens if t.lower() not in self.stopwords]
        if self._lemmatize is not None:
            tokens = [self._lemmatize(t) for t in tokens]
        if self._stem is not None:
            tokens = [self._stem(t) for t in tokens]
        return tokens

    def detokenize(self, tokens: list[str]) -> str:
        """Readable text from tokens: the inverse of tokenization as far as it can be inverted."""
        if self.tokenizer == "char":
            return "".join(t if t != "<eos>" else "\n" for t in tokens)
        if self.tokenizer == "treebank":
            from nltk.tokenize.treebank import TreebankWordDetokenizer

            lines = " ".join(tokens).split("<eos>")
            detok = TreebankWordDetokenizer()
            return "\n".join(detok.detokenize(line.split()) for line in lines)
        return "\n".join(" ".join(line.split()) for line in " ".join(tokens).split("<eos>"))


def tokenize_lines(text: str, preprocess: Preprocessor, keep_empty_lines: bool) -> list[str]:
    """Tokens of every line followed by ``<eos>``, as word_language_model's ``Corpus`` does."""
    tokens: list[str] = []
    for line in text.splitlines():
        words = preprocess(line)
        if words or keep_empty_lines:
            tokens.extend(words)
            tokens.append(EOS)
    return tokens
