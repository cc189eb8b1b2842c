"""The token path's LightningDataModule: raw text -> NLTK tokens -> cached ids -> truncated-BPTT stream windows."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from lm_lightning.data.base import StreamDataModule, check_positive, default_cache_dir
from lm_lightning.data.batch import Batch
from lm_lightning.data.cache import TokenCache, cache_key

# tokenize_lines lives beside the Preprocessor (torch-free, for deploy/); imported here so the cache build calls it by
# this module's name, which tests replace to count tokenizations.
from lm_lightning.data.preprocessing import Preprocessor, Stemmer, Tokenizer, tokenize_lines
from lm_lightning.data.sources import Corpus, load_corpus
from lm_lightning.data.splits import SPLITS
from lm_lightning.data.vocabulary import Vocabulary
from lm_lightning.data.windows import TokenRows
from lm_lightning.errors import LMInputError

log = logging.getLogger(__name__)


def check_words_left(vocab: Vocabulary, counts: Counter, min_freq: int) -> None:
    """A vocabulary of only ``<unk>`` and ``<eos>`` trains to a low "perplexity" of predicting line ends (1.59 on
    the tiny test corpus, issue 8) without learning a word: refused, with the ``min_freq`` that would keep words."""
    words = len(vocab) - len(vocab.specials)
    if words == 0:
        seen = [c for w, c in counts.items() if w not in vocab.specials]
        top = max(seen, default=0)
        fix = f"lower --data.min_freq to {top} or less" if top else "check --data.source and the preprocessing settings"
        raise LMInputError(
            f"--data.min_freq {min_freq} leaves 0 words in the vocabulary (the most frequent of train's {len(seen)} "
            f"distinct words occurs {top} times): {fix}."
        )
    if words < 10:
        log.warning("Only %d words occur at least --data.min_freq %d times: the model will see mostly <unk>.", words, min_freq)


class TokenDataModule(StreamDataModule):
    """Text corpus as batches of parallel token streams for truncated BPTT.

    Args:
        source: ``embedded`` (Python's bundled documentation, offline), ``wikitext-2``, ``ptb``,
            ``nltk:<corpus>`` (e.g. ``nltk:brown``), or a path to a folder with train.txt/valid.txt/test.txt
            or to one text file (split deterministically).
        data_dir: Folder holding (or receiving) ``wikitext-2``/``ptb`` files; default
            ``~/.cache/lm_lightning/data/<name>`` or ``$LM_LIGHTNING_DATA/<name>``.
        tokenizer: ``treebank`` (NLTK word tokenizer), ``whitespace`` (pre-tokenized text) or ``char``.
        lowercase: Lowercase the text first.
        remove_stopwords: Drop stop words (off for language modelling: the model must predict them).
        stemmer: ``porter`` or ``snowball`` stemming, or none.
        lemmatize: WordNet lemmatization (needs NLTK's wordnet data).
        keep_empty_lines: Give empty lines an ``<eos>`` too (matches the published WikiText-2 token counts).
        min_freq: Words seen fewer times in train become ``<unk>``.
        max_vocab_size: Keep at most this many tokens (specials included); ``None`` for no cap.
        batch_size: Parallel streams per training batch (per device under DDP); the effective batch under
            ``MicroBatchAccumulation``, which feeds it in micro-batches.
        eval_batch_size: Parallel streams for validation and test.
        bptt: Window length in tokens (truncated backpropagation through time).
        valid_fraction: Share of a single text used for validation (ignored for folders and named corpora).
        test_fraction: Share of a single text used for test.
        cache_dir: Where token ids are cached (``$LM_LIGHTNING_CACHE`` or ``~/.cache/lm_lightning/tokens``).
        prompt: Text that ``predict`` continues.
        num_prompts: How many samples ``predict`` generates from the prompt.
    """

    def __init__(
        self,
        source: str = "embedded",
        data_dir: Optional[str] = None,
        tokenizer: Tokenizer = "treebank",
        lowercase: bool = True,
        remove_stopwords: bool = False,
        stemmer: Optional[Stemmer] = None,
        lemmatize: bool = False,
        keep_empty_lines: bool = False,
        min_freq: int = 2,
        max_vocab_size: Optional[int] = None,
        batch_size: int = 32,
        eval_batch_size: int = 10,
        bptt: int = 35,
        valid_fraction: float = 0.05,
        test_fraction: float = 0.05,
        cache_dir: Optional[str] = None,
        prompt: str = "the",
        num_prompts: int = 1,
    ) -> None:
        super().__init__()
        check_positive(batch_size=batch_size, eval_batch_size=eval_batch_size, bptt=bptt, num_prompts=num_prompts, min_freq=min_freq)
        if max_vocab_size is not None and max_vocab_size <= len(Vocabulary.specials):
            raise LMInputError(
                f"--data.max_vocab_size {max_vocab_size} leaves no room for a word ({' and '.join(Vocabulary.specials)} take "
                f"{len(Vocabulary.specials)} places): give at least {len(Vocabulary.specials) + 1}, or null for no cap."
            )
        self.save_hyperparameters()
        # Built here, not in setup(): a bad setting should fail before any training starts.
        self.preprocessor = Preprocessor(tokenizer, lowercase, remove_stopwords, stemmer, lemmatize)
        self._cache: Optional[TokenCache] = None

    # --- vocabulary and cache -------------------------------------------------------------------------
    def _settings(self) -> dict:
        hp = self.hparams
        return {
            **self.preprocessor.settings(),
            "keep_empty_lines": hp.keep_empty_lines,
            "min_freq": hp.min_freq,
            "max_vocab_size": hp.max_vocab_size,
            "valid_fraction": hp.valid_fraction,
            "test_fraction": hp.test_fraction,
        }

    def _load_or_build(self) -> Vocabulary:
        hp = self.hparams
        corpus = load_corpus(hp.source, hp.data_dir, hp.valid_fraction, hp.test_fraction)
        self._cache = TokenCache(hp.cache_dir or default_cache_dir(), cache_key(corpus.content_hash(), self._settings()))
        built = []
        # Checked when opened; built (or rebuilt, if damaged) under a lock that other ranks wait on (data/cache.py).
        vocab = self._cache.open(lambda: built.append(True) or self._build(corpus))
        log.info("Token cache %s: %s", "written" if built else "hit", self._cache.path)
        return vocab

    def _build(self, corpus: Corpus) -> tuple[Vocabulary, dict[str, np.ndarray], dict]:
        start = time.perf_counter()
        keep = self.hparams.keep_empty_lines
        tokens = {split: tokenize_lines(corpus[split], self.preprocessor, keep) for split in SPLITS}
        for split in SPLITS:
            if not tokens[split]:
                raise LMInputError(
                    f"The {split} split of {corpus.name!r} has no tokens after preprocessing: check the text and the "
                    "preprocessing settings."
                )
        counts = Counter(tokens["train"])
        vocab = Vocabulary.build(counts, self.hparams.min_freq, self.hparams.max_vocab_size)
        check_words_left(vocab, counts, self.hparams.min_freq)
        ids = {split: vocab.encode_array(tokens[split]) for split in SPLITS}
        meta = {
            "corpus": corpus.name,
            "settings": self._settings(),
            "tokens": {split: int(len(ids[split])) for split in SPLITS},
            "vocab_size": len(vocab),
            "stopwords_source": self.preprocessor.stopwords_source,
        }
        log.info(
            "Tokenized %s in %.1fs: %s tokens, vocabulary %d",
            corpus.name,
            time.perf_counter() - start,
            meta["tokens"],
            len(vocab),
        )
        return vocab, ids, meta

    def ids(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped from the cache."""
        return self.rows(split).ids

    def _rows(self, split: str) -> TokenRows:
        assert self._cache is not None
        return TokenRows(self._cache.load_ids(split))

    def export_settings(self) -> dict:
        """What an export needs to read text as this datamodule does (``lm_lightning/export/commands.py``): preprocessing,
        line ends, and the evaluation batching its test perplexity was measured with."""
        hp = self.hparams
        return {
            "kind": "tokens",
            "preprocessing": self.preprocessor.arguments(),
            "keep_empty_lines": hp.keep_empty_lines,
            "eval_batch_size": hp.eval_batch_size,
            "bptt": hp.bptt,
        }

    # --- prediction -----------------------------------------------------------------------------------
    def predict_dataloader(self) -> DataLoader:
        """The prompt as ids, ``num_prompts`` times: each copy gives one sample."""
        ids = self.vocab.encode(self.preprocessor(self.hparams.prompt)) or [self.vocab.eos_id]
        prompts = [Batch.prompt(torch.tensor([ids]), len(ids)) for _ in range(self.hparams.num_prompts)]
        return DataLoader(prompts, batch_size=None)

    def decode(self, ids) -> str:
        return self.preprocessor.detokenize(self.vocab.decode(ids))

    def unigram_perplexity(self, split: str = "valid") -> float:
        """Perplexity of train's add-one-smoothed unigram distribution on ``split``: the baseline to beat."""
        counts = np.bincount(np.asarray(self.ids("train")), minlength=self.vocab_size).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        return float(np.exp(-logp[np.asarray(self.ids(split))].mean()))
