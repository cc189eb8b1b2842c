"""What both runtimes of an export share, torch-free: text read as the export's training data was read.

``OnnxModel`` (``deploy/runtime.py``, ONNX Runtime) and ``ExportedModel`` (``export/commands.py``, torch) both take
this: the prompt's encoding, the decoding of generated rows, and the ids of a text to score with the checks and
sentences of bad input, and, at load, the check of the manifest's text settings against the data module's flags.
Each runs its own network on them.
"""

from __future__ import annotations

import inspect
import reprlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional, get_args

import numpy as np

from lm_lightning.data.preprocessing import Preprocessor, Stemmer, Tokenizer, tokenize_lines
from lm_lightning.data.sources import read_text
from lm_lightning.data.vocabulary import Vocabulary
from lm_lightning.errors import LMInputError


class ReadsText:
    """Mixed into an export's runtime: needs ``vocab`` and ``text`` (the datamodule's ``export_settings()``) and a
    ``score_text(text, name)``."""

    vocab: Vocabulary
    text: dict

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor(**self.text["preprocessing"])

    def encode_prompt(self, prompt: str) -> list[int]:
        """As ``predict`` does: the prompt's tokens (unknown words become ``<unk>``); an empty prompt is ``<eos>``."""
        return self.vocab.encode(self.preprocessor(prompt)) or [self.vocab.eos_id]

    def decode_rows(self, rows: Iterable[Iterable[int]]) -> list[str]:
        preprocessor = self.preprocessor
        return [preprocessor.detokenize(self.vocab.decode(list(row))) for row in rows]

    def ids_to_score(self, text: str, name: str) -> np.ndarray:
        """``text``'s ids, tokenized as the export's training data; refused in one sentence when empty or shorter than
        one evaluation window (the export's streams x its window + 1)."""
        tokens = tokenize_lines(text, self.preprocessor, self.text["keep_empty_lines"])
        if not tokens:
            raise LMInputError(f"{name} has no tokens after preprocessing: give a file with text in it.")
        ids = self.vocab.encode_array(tokens)
        streams, bptt = self.text["eval_batch_size"], self.text["bptt"]
        if len(ids) < streams * (bptt + 1):
            raise LMInputError(
                f"{name} has {len(ids):,} tokens, fewer than one evaluation window needs ({streams} streams x "
                f"{bptt + 1} tokens = {streams * (bptt + 1):,}): give a longer text (the export's test perplexity was "
                "measured in such windows)."
            )
        return ids

    def score_file(self, path: str | Path) -> dict:
        path = Path(path)
        if not path.exists():
            raise LMInputError(f"{path} does not exist: give the text file to score.")
        return self.score_text(read_text(path, "the file to score"), str(path))

    def score_text(self, text: str, name: str = "the text") -> dict:  # pragma: no cover - each runtime defines it
        raise NotImplementedError


# What the data modules' flags take (their typed arguments, --data.*), for what an export's manifest records of them in
# metadata["text"] (``TokenDataModule.export_settings()``, ``BagDataModule.export_settings()``): a value the flag would
# refuse goes no further, where it would end in a TypeError inside the tokenizer. "language" has no flag: a name (no
# path reaches NLTK's data loader), which the stop-word list and the Snowball stemmer check themselves.
def _flag(key: str, *takes: str) -> str:
    return f"--data.{key} takes {', '.join(takes[:-1])} or {takes[-1]}" if len(takes) > 1 else f"--data.{key} takes {takes[0]}"


SETTING_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "tokenizer": (_flag("tokenizer", *get_args(Tokenizer)), lambda v: v in get_args(Tokenizer)),
    "stemmer": (_flag("stemmer", *get_args(Stemmer), "nothing"), lambda v: v is None or v in get_args(Stemmer)),
    "language": ("a language is a name such as english", lambda v: isinstance(v, str) and v.isidentifier()),
    **{
        key: (_flag(key, "true", "false"), lambda v: type(v) is bool)
        for key in ("lowercase", "remove_stopwords", "lemmatize", "keep_empty_lines", "drop_punctuation")
    },
    **{key: (_flag(key, "a positive integer"), lambda v: type(v) is int and v >= 1) for key in ("eval_batch_size", "bptt", "window")},
}  # fmt: skip
KIND_SETTINGS = {
    "tokens": ("keep_empty_lines", "eval_batch_size", "bptt"),
    "bags": ("window", "drop_punctuation", "eval_batch_size", "bptt"),
}


def text_settings_problem(text: dict, kinds: Iterable[str] = tuple(KIND_SETTINGS)) -> Optional[str]:
    """Why an export's ``metadata["text"]`` (a dict with a ``kind``) is not what a data module of ``kinds`` writes,
    or None: the clause of the loader's one sentence."""
    kinds = tuple(kinds)
    if text["kind"] not in kinds:
        return f"its manifest's text kind is {reprlib.repr(text['kind'])}, not {' or '.join(kinds)}"
    preprocessing = text.get("preprocessing")
    if not isinstance(preprocessing, dict):
        return "its manifest's text settings hold no preprocessing object"
    unknown = sorted(set(preprocessing) - set(inspect.signature(Preprocessor).parameters))  # older exports lack some
    if unknown:
        return f"its manifest's text preprocessing names {unknown}, which no --data flag sets"
    for key, value in {**preprocessing, **{key: text.get(key) for key in KIND_SETTINGS[text["kind"]]}}.items():
        rule, takes = SETTING_RULES[key]
        if not takes(value):
            return f"its manifest's text setting {key} is {reprlib.repr(value)}: {rule}"
    return None
