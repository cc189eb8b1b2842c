"""The vocabulary: order, limits, unknown words, and its JSON file (never pickled), corrupt or missing."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import numpy as np
import pytest
from conftest import (
    cache_entries,
)

from lm_lightning.data import Vocabulary
from lm_lightning.errors import LMInputError

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
