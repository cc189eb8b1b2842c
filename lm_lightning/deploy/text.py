"""What both runtimes of an export share, torch-free: text read as the export's training data was read.

``OnnxModel`` (``deploy/runtime.py``, ONNX Runtime) and ``ExportedModel`` (``export/commands.py``, torch) both take
this: the prompt's encoding, the decoding of generated rows, and the ids of a text to score with the checks and
sentences of bad input. Each runs its own network on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lm_lightning.data.preprocessing import Preprocessor, tokenize_lines
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
