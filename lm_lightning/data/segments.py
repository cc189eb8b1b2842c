"""Bag-of-words segments: raw text -> segments (sentences, lines or windows) -> NLTK word lists -> scikit-learn counts.

Each segment goes through the same :class:`Preprocessor` as the token path (for bags: stop words removed, Porter stems,
punctuation dropped by default), and ``CountVectorizer`` turns the word lists into a sparse count matrix, one row per
segment. Words seen in fewer than ``min_df`` train segments count as ``<unk>``, which keeps per-word perplexity over
every word of a segment. ``data/bag.py`` caches the matrices and lays them out as stream windows.
"""

from __future__ import annotations

import logging
import re
from typing import Literal, Optional

import numpy as np
from scipy import sparse

from lm_lightning.data.preprocessing import Preprocessor
from lm_lightning.data.vocabulary import UNK, Vocabulary
from lm_lightning.errors import LMInputError

log = logging.getLogger(__name__)

Segment = Literal["auto", "sentence", "line", "window"]
WORD = re.compile(r"\w")  # a token with no letter or digit is punctuation


class BagVocabulary(Vocabulary):
    """Words of the bags; id 0 is ``<unk>``. No ``<eos>``: a bag has no end of sequence to predict."""

    specials = (UNK,)


def punkt_available() -> bool:
    import nltk

    for resource in ("tokenizers/punkt_tab/english/", "tokenizers/punkt/english.pickle"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            pass
    return False


def split_segments(text: str, segment: Segment) -> list[str]:
    """Raw text of each sentence (paragraphs cut by Punkt) or line; blank lines separate and are not segments."""
    if segment == "sentence":
        from nltk.tokenize import sent_tokenize

        paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
        return [s for p in paragraphs if p for s in sent_tokenize(p)]
    return [line for line in text.splitlines() if line.strip()]


class Segmenter:
    """Raw text -> word lists, one per segment, and a count of the segments that came out empty (and why)."""

    def __init__(self, preprocess: Preprocessor, segment: Segment, window: int, drop_punctuation: bool) -> None:
        self.preprocess, self.segment, self.window, self.drop_punctuation = preprocess, segment, window, drop_punctuation
        self._tokenize = Preprocessor(preprocess.tokenizer, preprocess.lowercase)  # only to tell why a segment is empty

    def words(self, text: str) -> list[str]:
        words = self.preprocess(text)
        return [w for w in words if WORD.search(w)] if self.drop_punctuation else words

    def __call__(self, text: str) -> tuple[list[list[str]], dict[str, int]]:
        if self.segment == "window":
            stream = [w for line in text.splitlines() for w in self.words(line)]
            segments = [stream[i : i + self.window] for i in range(0, len(stream), self.window)]
            return segments, {"segments": len(segments), "empty": 0, "only_stopwords": 0}
        segments, empty, only_stopwords = [], 0, 0
        for raw in split_segments(text, self.segment):
            words = self.words(raw)
            if words:
                segments.append(words)
                continue
            empty += 1
            tokens = [t for t in self._tokenize(raw) if WORD.search(t)]
            only_stopwords += bool(tokens) and all(t in self.preprocess.stopwords for t in tokens)
        return segments, {"segments": len(segments), "empty": empty, "only_stopwords": only_stopwords}


def count_matrix(segments: list[list[str]], vocab: Vocabulary) -> sparse.csr_matrix:
    """``(segments, vocab)`` float32 counts with scikit-learn's ``CountVectorizer`` on our word lists; OOV -> ``<unk>``."""
    from sklearn.feature_extraction.text import CountVectorizer

    stoi = vocab.stoi
    vectorizer = CountVectorizer(
        analyzer=lambda words: [w if w in stoi else UNK for w in words], vocabulary=stoi, dtype=np.float32
    )
    return vectorizer.transform(segments).tocsr()  # rows with distinct, sorted column ids


def build_vocabulary(train: list[list[str]], min_df: int, max_vocab_size: Optional[int]) -> BagVocabulary:
    """Words in at least ``min_df`` train segments (``CountVectorizer``'s document frequency), most frequent first."""
    from sklearn.feature_extraction.text import CountVectorizer

    max_features = None if max_vocab_size is None else max_vocab_size - len(BagVocabulary.specials)
    vectorizer = CountVectorizer(analyzer=lambda words: words, min_df=min_df, max_features=max_features, dtype=np.int64)
    try:
        counts = vectorizer.fit_transform(train)
    except ValueError:  # "After pruning, no terms remain" or "max_df corresponds to < documents than min_df"
        raise LMInputError(
            f"The vocabulary is empty: no word occurs in {min_df} or more of the {len(train)} train segments "
            "(--data.min_df): lower --data.min_df, or use longer segments or a larger corpus."
        ) from None
    words = vectorizer.get_feature_names_out().tolist()
    totals = np.asarray(counts.sum(axis=0)).ravel()
    # Most frequent first, then alphabetically, as Vocabulary.build; a literal "<unk>" in the text (PTB) is id 0.
    order = sorted((i for i, w in enumerate(words) if w != UNK), key=lambda i: (-totals[i], words[i]))
    return BagVocabulary([UNK, *(words[i] for i in order)])


def resolve_segment(segment: Segment) -> Segment:
    """``auto`` -> sentences if NLTK's Punkt is installed, else lines (logged); ``sentence`` without Punkt fails."""
    if segment not in ("auto", "sentence"):
        return segment
    has_punkt = punkt_available()
    if segment == "sentence" and not has_punkt:
        raise LMInputError(
            "--data.segment sentence needs NLTK's Punkt sentence model, which is not installed: run "
            "`python -m nltk.downloader punkt_tab` (or point NLTK_DATA at a folder that has it), or use --data.segment line "
            "or window."
        )
    log.info(
        "Segments: %s.", "sentences (NLTK Punkt)" if has_punkt else "lines, because NLTK's Punkt sentence model is not installed"
    )
    return "sentence" if has_punkt else "line"
