"""What a safetensors export folder does on its own, in PyTorch: generate text, score a text file, name the likeliest
next words (a bag-of-words export). An ONNX export does the same without torch (``deploy/runtime.py``); the
``generate`` and ``score`` commands (``deploy/commands.py``) pick the runtime from the folder.

No corpus, checkpoint or training config is needed: the folder holds the network, its vocabulary and how the
training data was read (preprocessing, line ends, evaluation batching; written by the export step). The network runs
through torch with float32 weights (an int8/int4 export's codes dequantized by ``loader.py``).

From Python::

    from lm_lightning.export.commands import ExportedModel
    model = ExportedModel.load("lightning_logs/version_0/export-int8")
    model.generate("the meaning of", max_new_tokens=40)
    model.score_file("some_text.txt")      # {"ppl": ..., "tokens": ...}
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lm_lightning.data.segments import BagVocabulary, Segmenter, count_matrix
from lm_lightning.data.vocabulary import Vocabulary
from lm_lightning.data.windows import StreamWindows
from lm_lightning.deploy.sampling import check_sampling
from lm_lightning.deploy.text import ReadsText, text_settings_problem
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import perplexity
from lm_lightning.export.checks import one_line
from lm_lightning.export.format import MANIFEST, VOCAB
from lm_lightning.export.loader import load_exported
from lm_lightning.generation import sample

__all__ = ["ExportedModel"]


@dataclass
class ExportedModel(ReadsText):
    network: nn.Module
    vocab: Vocabulary
    text: dict  # the datamodule's export_settings(): how text was read
    metadata: dict
    folder: Path

    @classmethod
    def load(cls, folder: str | Path) -> ExportedModel:
        folder = Path(folder)
        network = load_exported(folder)  # every check of the folder, one sentence on failure
        metadata = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("metadata") or {}
        text = metadata.get("text")
        if not (folder / VOCAB).is_file() or not isinstance(text, dict) or "kind" not in text:
            raise LMInputError(
                f"{folder} holds a network but not how to read text (its vocabulary and preprocessing): it was written "
                "by an older version or by export_model() without a datamodule; export the run again with "
                "`python -m lm_lightning export -c RUN/config.yaml --ckpt_path CKPT`."
            )
        problem = text_settings_problem(text)
        if not problem:
            try:  # not Vocabulary.load, whose sentence is a cache's ("delete it to rebuild it")
                itos = json.loads((folder / VOCAB).read_bytes())["itos"]
                model = cls(network, (BagVocabulary if text["kind"] == "bags" else Vocabulary)(itos), text, metadata, folder)
            except (ValueError, KeyError, TypeError, RecursionError) as err:  # LMInputError is a ValueError
                problem = f"{VOCAB} is not a vocabulary ({one_line(err)})"
        problem = problem or model._size_problem()
        if problem:
            raise LMInputError(f"{folder} is not a readable lm_lightning export: {problem}; export the model again.")
        return model

    @property
    def is_bag_model(self) -> bool:
        return self.text["kind"] == "bags"

    # --- tokens ---------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 50,
        temperature: float = 0.8,
        top_k: Optional[int] = 50,
        seed: int = 0,
        num_samples: int = 1,
    ) -> list[str]:
        """``num_samples`` continuations of ``prompt`` (the prompt included), sampled together as parallel streams."""
        self._needs("tokens", "generate")
        check_sampling(max_new_tokens, temperature, top_k, num_samples)
        ids = torch.tensor([self.encode_prompt(prompt)] * num_samples)
        generator = torch.Generator().manual_seed(seed)
        out = sample(self.network, ids, max_new_tokens, temperature, top_k, generator)
        return self.decode_rows(out.tolist())

    def score_text(self, text: str, name: str = "the text") -> dict:
        """Perplexity of ``text``, read and batched as the export's test split was (same streams and window)."""
        self._needs("tokens", "score")
        ids = self.ids_to_score(text, name)
        windows = StreamWindows(ids, self.text["eval_batch_size"], self.text["bptt"], split="scored text")
        start = time.perf_counter()
        ppl = perplexity(self.network, windows)
        return {
            "ppl": ppl,
            "tokens": len(ids),
            "unknown": int((ids == self.vocab.unk_id).sum()),
            "seconds": time.perf_counter() - start,
        }

    # --- bags -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def next_words(self, prompt: str, count: int = 10) -> list[tuple[str, float]]:
        """The ``count`` likeliest words of the segment after ``prompt`` (a bag-of-words export), with probabilities."""
        self._needs("bags", "next_words")
        from lm_lightning.data.bag import as_bags

        settings = self.text
        words = Segmenter(self.preprocessor, "line", settings["window"], settings["drop_punctuation"]).words(prompt)
        logits, _ = self.network(as_bags(count_matrix([words], self.vocab), streams=1))
        probs = logits[0, -1].float().softmax(-1)
        top = probs.topk(min(count, probs.numel()))
        return list(zip(self.vocab.decode(top.indices.tolist()), top.values.tolist()))

    @torch.no_grad()
    def _size_problem(self) -> Optional[str]:
        """Whether the vocabulary and the network disagree: the logits' width of one step (any network), and the rows
        of its embedding (the contract's optional ``embedding``: an nn.Embedding(Bag), or a layer whose ``config``
        holds its ``vocab_size``, as the adaptive input's). A vocabulary of another size decodes wrong words (or none:
        IndexError) and scores a wrong perplexity."""
        if self.is_bag_model:
            from lm_lightning.data.bag import as_bags

            inputs = as_bags(count_matrix([[]], self.vocab), streams=1)
        else:
            inputs = torch.zeros(1, 1, dtype=torch.long)
        outputs = self.network(inputs)[0].shape[-1]
        embedding = getattr(self.network, "embedding", None)
        inputs = getattr(embedding, "num_embeddings", None) or (getattr(embedding, "config", None) or {}).get("vocab_size")
        for size, what in ((outputs, "the network predicts"), (inputs, "the network's embedding reads")):
            if size is not None and size != len(self.vocab):
                return f"{VOCAB} holds {len(self.vocab)} tokens, {what} {size}"
        return None

    def _needs(self, kind: str, what: str) -> None:
        if self.text["kind"] != kind:
            other = "next_words" if kind == "tokens" else "generate and score"
            raise LMInputError(
                f"{self.folder} is a {'bag-of-words' if self.is_bag_model else 'token'} model: {what} needs a "
                f"{'token' if kind == 'tokens' else 'bag-of-words'} model; use {other} with it."
            )
