"""An ONNX export generating and scoring text with ONNX Runtime and numpy: no torch, no Lightning in the process.

What the torch path's ``ExportedModel`` (``export/commands.py``) does, on the same folder contents and with the
same sentences for bad input: prompts read as ``predict`` reads them, text scored in the windows and with the
perplexity its test split was measured with, the recurrent state carried from call to call.

    from lm_lightning.deploy.runtime import OnnxModel
    model = OnnxModel.load("lightning_logs/version_0/export-onnx")
    model.generate("the meaning of", max_new_tokens=40)
    model.score_file("some_text.txt")      # {"ppl": ..., "tokens": ..., "unknown": ..., "seconds": ...}
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort

from lm_lightning.data.vocabulary import Vocabulary
from lm_lightning.deploy.folder import open_export
from lm_lightning.deploy.sampling import check_memory, check_sampling, next_tokens
from lm_lightning.deploy.scoring import stream_groups, stream_windows, summed_nll
from lm_lightning.deploy.text import ReadsText, text_settings_problem
from lm_lightning.errors import LMInputError

__all__ = ["OnnxModel"]

# Scoring runs a window's streams in groups whose logits fit this: a window of 10 streams x 35 tokens at WikiText-2's
# 33,278 words is 47 MB of logits, held twice (ONNX Runtime's and the copy out); in groups the peak is a few MB.
SCORE_LOGITS_BYTES = 8 << 20


@dataclass
class OnnxModel(ReadsText):
    session: ort.InferenceSession
    graph: dict  # the manifest's "graph": names of ids, logits and state, the state's shapes
    vocab: Vocabulary
    text: dict  # the datamodule's export_settings(): how text was read
    metadata: dict
    folder: Path

    @classmethod
    def load(cls, folder: str | Path, threads: int = 1) -> OnnxModel:
        export = open_export(folder, threads)  # every check of the folder and the graph, one sentence on failure
        metadata = export.manifest["metadata"]
        text = metadata.get("text")
        if export.vocab is None or not isinstance(text, dict) or "kind" not in text:
            raise LMInputError(
                f"{export.folder} holds a network but not how to read text (its vocabulary and preprocessing): it was "
                "written by an older version or by export_onnx() without a datamodule; export the run again with "
                "`python -m lm_lightning export -c RUN/config.yaml --ckpt_path CKPT --export.format onnx`."
            )
        problem = text_settings_problem(text, kinds=["tokens"])  # a bag-of-words model has no ONNX export
        if problem:
            raise LMInputError(f"{export.folder} is not a readable lm_lightning ONNX export: {problem}; export the model again.")
        _import_nltk_alone(text["preprocessing"])
        return cls(export.session, export.manifest["graph"], export.vocab, text, metadata, export.folder)

    def run(self, ids: np.ndarray, state: Optional[list[np.ndarray]] = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """The network contract on arrays: logits (batch, time, vocab) and the new state, from zeros when ``None``."""
        logits, *state = self.session.run([self.graph["logits"], *self._state_outputs], self._feeds(ids, state))
        return logits, state

    def run_top_k(
        self, ids: np.ndarray, k: int, state: Optional[list[np.ndarray]] = None
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """The last step's ``k`` likeliest tokens, ``(values, ids)`` each (batch, k), and the new state: the graph's own
        TopK (``deploy/layout.py`` says why), without copying the vocabulary-wide logits out."""
        feeds = self._feeds(ids, state)
        feeds[self.graph["top_k"]] = np.array([k], dtype=np.int64)
        values, top, *state = self.session.run([self.graph["top_logits"], self.graph["top_ids"], *self._state_outputs], feeds)
        return values, top, state

    @property
    def _state_outputs(self) -> list[str]:
        return [s["output"] for s in self.graph["state"]]

    def _feeds(self, ids: np.ndarray, state: Optional[list[np.ndarray]]) -> dict[str, np.ndarray]:
        return graph_feeds(self.graph, ids, state)

    # --- generate -------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 50,
        temperature: float = 0.8,
        top_k: Optional[int] = 50,
        seed: int = 0,
        num_samples: int = 1,
    ) -> list[str]:
        """``num_samples`` continuations of ``prompt`` (the prompt included), sampled together as parallel streams.
        Settings out of ``deploy/sampling.py``'s bounds, or more tokens than memory holds, raise :class:`LMInputError`."""
        check_sampling(max_new_tokens, temperature, top_k, num_samples)
        ids = self.encode_prompt(prompt)
        k = 1 if temperature == 0 else top_k  # greedy is the top 1
        check_memory(num_samples, len(ids) + max_new_tokens, min(k or self.graph["vocab_size"], self.graph["vocab_size"]))
        rng = np.random.default_rng(seed)
        tokens = [np.array([ids] * num_samples, dtype=np.int64)]
        state = None
        for _ in range(max_new_tokens):
            if k is not None and k < self.graph["vocab_size"]:  # sample among the graph's top k
                values, top, state = self.run_top_k(tokens[-1], k, state)
                choice = next_tokens(values, temperature, None, rng)
                tokens.append(np.take_along_axis(top, choice, axis=1))
            else:  # every token: the whole last step's logits
                logits, state = self.run(tokens[-1], state)
                tokens.append(next_tokens(logits[:, -1], temperature, None, rng))
        return self.decode_rows(np.concatenate(tokens, axis=1).tolist())

    # --- score ----------------------------------------------------------------------------------------
    def score_text(self, text: str, name: str = "the text") -> dict:
        """Perplexity of ``text``, read and batched as the export's test split was (same streams and window)."""
        ids = self.ids_to_score(text, name)
        streams, bptt = self.text["eval_batch_size"], self.text["bptt"]
        start = time.perf_counter()
        groups = stream_groups(streams, bptt, self.graph["vocab_size"], SCORE_LOGITS_BYTES)
        states: list[Optional[list[np.ndarray]]] = [None] * len(groups)
        total, count = 0.0, 0
        for inputs, targets in stream_windows(ids, streams, bptt):
            for i, group in enumerate(groups):
                logits, states[i] = self.run(inputs[group], states[i])
                total += summed_nll(logits, targets[group])
            count += targets.size
        return {
            "ppl": math.exp(total / count),
            "tokens": len(ids),
            "unknown": int((ids == self.vocab.unk_id).sum()),
            "seconds": time.perf_counter() - start,
        }


def graph_feeds(graph: dict, ids: np.ndarray, state: Optional[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """The inputs of an export's graph (its manifest's ``graph``): the ids, and the state, zeros when ``None``."""
    feeds = {graph["ids"]: np.ascontiguousarray(ids, dtype=np.int64)}
    for i, s in enumerate(graph["state"]):
        shape = [len(ids) if d == s["batch_axis"] else n for d, n in enumerate(s["shape"])]
        feeds[s["input"]] = state[i] if state is not None else np.zeros(shape, dtype=np.float32)
    return feeds


def _import_nltk_alone(preprocessing: dict) -> None:
    """Import NLTK, when the export's preprocessing uses it, without scipy and scikit-learn.

    NLTK's ``__init__`` imports all of NLTK, and with it scipy and scikit-learn where they are installed, for
    classifiers and statistics that tokenizing never runs: more resident memory and import time than the rest of
    this process together. NLTK imports them under ``try/except ImportError``, so they are hidden while it loads.
    ``OnnxModel.load`` does that when NLTK is not imported yet: a process that deploys a model runs NLTK's tokenizer
    and nothing else of it (a process that imported NLTK before keeps it as it is). A stop-word list taken from
    scikit-learn (no NLTK data installed) still imports scikit-learn later, unhidden.
    """
    uses_nltk = preprocessing.get("tokenizer", "treebank") == "treebank" or any(
        preprocessing.get(key) for key in ("remove_stopwords", "stemmer", "lemmatize")
    )
    if not uses_nltk or "nltk" in sys.modules:
        return
    hidden = [name for name in ("scipy", "sklearn") if name not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden, None))  # None in sys.modules: `import scipy` raises ImportError
    try:
        import nltk  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
