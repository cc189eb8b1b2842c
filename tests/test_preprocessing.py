"""NLTK preprocessing: tokenizers, stop words (NLTK's or scikit-learn's), stemmers, lemmatization, detokenizing.

Tests that must see NLTK data present or absent point ``nltk.data.path`` at a folder themselves (conftest's
``shared_nltk`` / ``no_nltk_data``) instead of depending on what this machine has installed.
"""

from __future__ import annotations

import hashlib

import nltk
import pytest
from conftest import (
    fresh_stopwords_loader,
)

from lm_lightning.data import Preprocessor
from lm_lightning.data.tokens import tokenize_lines
from lm_lightning.errors import LMInputError


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
