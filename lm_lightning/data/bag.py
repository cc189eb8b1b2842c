"""Bag-of-words batches: raw text -> segments -> NLTK words -> scikit-learn counts (scipy CSR) -> stream windows.

The corpus is cut into segments: sentences when NLTK's Punkt model is installed, otherwise lines, or windows of W
words. Each segment goes through the same :class:`Preprocessor` as the token path (for bags: stop words removed,
Porter stems, punctuation dropped by default), and ``CountVectorizer`` turns the word lists into a sparse count
matrix, one row per segment, stored as CSR and cached like the token ids (content + settings hash, written
atomically). Words seen in fewer than ``min_df`` train segments count as ``<unk>``, which keeps per-word perplexity
over every word of a segment.

Segments are then laid out exactly as the token path lays out tokens, by the same ``StreamWindows`` (``windows.py``):
``batch_size`` parallel streams of consecutive segments, walked in windows of ``bptt`` segments, so the model's state
carries from one window to the next. A window reaches the model as :class:`~lm_lightning.networks.bag.Bags`, the CSR
rows of its segments (ids, offsets, counts): never as a dense batch x vocabulary matrix. ``batch_bytes`` says what
that saves.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from scipy import sparse
from torch.utils.data import DataLoader

from lm_lightning.data.bag_cache import BAG_CACHE_VERSION, check_bag_entry, save_bag_entry
from lm_lightning.data.base import StreamDataModule, check_positive, default_cache_dir
from lm_lightning.data.batch import Bags, Batch
from lm_lightning.data.cache import cache_key, open_or_build
from lm_lightning.data.preprocessing import Preprocessor, Stemmer, Tokenizer
from lm_lightning.data.segments import BagVocabulary, Segment, Segmenter, build_vocabulary, count_matrix, resolve_segment
from lm_lightning.data.sources import Corpus, load_corpus
from lm_lightning.data.splits import SPLITS
from lm_lightning.errors import LMInputError

log = logging.getLogger(__name__)


def batch_bytes(counts: sparse.csr_matrix, batch_size: int, bptt: int) -> dict[str, float]:
    """Bytes of one input batch of ``batch_size x bptt`` segments: the ``Bags`` triplets (int32 ids and offsets,
    float32 counts) at this matrix's mean distinct words per segment, against a dense float32 batch x bptt x vocab
    matrix. Targets are as large again in either form."""
    segments = batch_size * bptt
    words = counts.nnz / max(counts.shape[0], 1)
    sparse_bytes = segments * words * (4 + 4) + (segments + 1) * 4
    dense_bytes = segments * counts.shape[1] * 4
    return {
        "segments": segments,
        "distinct_words_per_segment": words,
        "vocab_size": counts.shape[1],
        "sparse_bytes": sparse_bytes,
        "dense_bytes": dense_bytes,
        "dense_over_sparse": dense_bytes / sparse_bytes,
    }


def as_bags(block: sparse.csr_matrix, streams: int) -> Bags:
    """CSR rows, ``streams`` x time of them in row-major order, as ``Bags`` tensors."""
    arrays = ((block.indices, np.int32), (block.indptr, np.int32), (block.data, np.float32))
    return Bags(*(torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)) for a, dtype in arrays), streams)


class BagRows:
    """A split's segments as rows for ``StreamWindows``: one CSR row per segment, weighted by its words."""

    unit = "non-empty segments"

    def __init__(self, counts: sparse.csr_matrix) -> None:
        self.counts = counts
        self.words = np.asarray(counts.sum(axis=1)).ravel()

    def __len__(self) -> int:
        return self.counts.shape[0]

    def take(self, index: np.ndarray) -> Bags:
        return as_bags(self.counts[index.reshape(-1)], index.shape[0])

    def weight(self, index: np.ndarray) -> float:
        return float(self.words[index].sum())


class BagDataModule(StreamDataModule):
    """Text corpus as windows of bag-of-words segments over parallel streams (the token path's ``TokenDataModule``,
    with segments in place of tokens): ``--data lm_lightning.data.BagDataModule``.

    Args:
        source: As for ``TokenDataModule``: ``embedded``, ``wikitext-2``, ``ptb``, ``nltk:<corpus>`` or a path.
        data_dir: Folder holding (or receiving) ``wikitext-2``/``ptb`` files.
        segment: ``sentence`` (needs NLTK's Punkt model), ``line``, ``window`` (``window`` words each), or ``auto``:
            sentences when Punkt is installed, otherwise lines.
        window: Words per segment with ``segment=window`` (counted after preprocessing).
        tokenizer: ``treebank`` (NLTK word tokenizer) or ``whitespace`` (pre-tokenized text).
        lowercase: Lowercase the text first.
        remove_stopwords: Drop stop words (NLTK's list if installed, else scikit-learn's); on for bags, whose counts
            would otherwise be mostly "the", "of" and "is".
        stemmer: ``porter`` or ``snowball`` stemming, so that "loop", "loops" and "looping" are one count; or none.
        lemmatize: WordNet lemmatization (needs NLTK's wordnet data).
        drop_punctuation: Drop tokens without a letter or digit.
        min_df: Words in fewer train segments than this count as ``<unk>`` (scikit-learn's document frequency).
        max_vocab_size: Keep at most this many words (``<unk>`` included); ``None`` for no cap.
        batch_size: Parallel streams of segments per training batch (the effective batch under ``MicroBatchAccumulation``).
        eval_batch_size: Parallel streams for validation and test.
        bptt: Window length in segments (truncated backpropagation through time).
        valid_fraction: Share of a single text used for validation (ignored for folders and named corpora).
        test_fraction: Share of a single text used for test.
        cache_dir: Where count matrices are cached (``$LM_LIGHTNING_CACHE`` or ``~/.cache/lm_lightning/tokens``).
        prompt: Text whose next segment ``predict`` describes by its likeliest words.
    """

    def __init__(
        self,
        source: str = "embedded",
        data_dir: Optional[str] = None,
        segment: Segment = "auto",
        window: int = 20,
        tokenizer: Tokenizer = "treebank",
        lowercase: bool = True,
        remove_stopwords: bool = True,
        stemmer: Optional[Stemmer] = "porter",
        lemmatize: bool = False,
        drop_punctuation: bool = True,
        min_df: int = 2,
        max_vocab_size: Optional[int] = None,
        batch_size: int = 16,
        eval_batch_size: int = 8,
        bptt: int = 16,
        valid_fraction: float = 0.05,
        test_fraction: float = 0.05,
        cache_dir: Optional[str] = None,
        prompt: str = "The for statement is used to iterate over the elements of a sequence.",
    ) -> None:
        super().__init__()
        check_positive(window=window, min_df=min_df, batch_size=batch_size, eval_batch_size=eval_batch_size, bptt=bptt)
        if segment not in ("auto", "sentence", "line", "window"):
            raise LMInputError(f"--data.segment must be auto, sentence, line or window, got {segment!r}.")
        if tokenizer == "char":
            raise LMInputError(
                "A bag of characters says little about the next segment: use --data.tokenizer treebank or whitespace."
            )
        if max_vocab_size is not None and max_vocab_size < 2:
            raise LMInputError(f"--data.max_vocab_size must be at least 2 (<unk> and one word), got {max_vocab_size}.")
        self.save_hyperparameters()
        # Built here, not in setup(): a bad setting should fail before any training starts.
        self.preprocessor = Preprocessor(tokenizer, lowercase, remove_stopwords, stemmer, lemmatize)
        self.segment = resolve_segment(segment)  # hparams keep what was asked, this what is used
        self._counts: dict[str, sparse.csr_matrix] = {}
        self._unigram: Optional[torch.Tensor] = None

    # --- vocabulary, counts and cache -----------------------------------------------------------------
    def counts(self, split: str) -> sparse.csr_matrix:
        """The split's ``(segments, vocab)`` float32 count matrix (CSR)."""
        _ = self.vocab  # builds or loads the cache on first use
        return self._counts[split]

    def _rows(self, split: str) -> BagRows:
        return BagRows(self._counts[split])

    def _settings(self) -> dict:
        hp = self.hparams
        return {
            "representation": "bow",
            "bag_version": BAG_CACHE_VERSION,
            **self.preprocessor.settings(),
            "segment": self.segment,
            "window": hp.window if self.segment == "window" else None,
            "drop_punctuation": hp.drop_punctuation,
            "min_df": hp.min_df,
            "max_vocab_size": hp.max_vocab_size,
            "valid_fraction": hp.valid_fraction,
            "test_fraction": hp.test_fraction,
        }

    def _load_or_build(self) -> BagVocabulary:
        hp = self.hparams
        corpus = load_corpus(hp.source, hp.data_dir, hp.valid_fraction, hp.test_fraction)
        # Same cache root as the token ids, an entry per corpus content + settings, written atomically (cache.py).
        folder = (
            Path(hp.cache_dir or default_cache_dir()).expanduser() / f"bow-{cache_key(corpus.content_hash(), self._settings())}"
        )
        built = []

        def write(tmp: Path) -> None:
            built.append(True)
            save_bag_entry(tmp, *self._build(corpus))

        # Checked when opened, rebuilt with one warning if damaged, built under a lock other ranks wait on (cache.py).
        vocab, self._counts = open_or_build(folder, check_bag_entry, write, "Bag-of-words cache")
        log.info("Bag-of-words cache %s: %s", "written" if built else "hit", folder)
        return vocab

    def _build(self, corpus: Corpus) -> tuple[BagVocabulary, dict[str, sparse.csr_matrix], dict]:
        start, hp = time.perf_counter(), self.hparams
        segmenter = Segmenter(self.preprocessor, self.segment, hp.window, hp.drop_punctuation)
        segments, stats = {}, {}
        for split in SPLITS:
            segments[split], stats[split] = segmenter(corpus[split])
            self._check_segments(corpus.name, split, stats[split])
        vocab = build_vocabulary(segments["train"], hp.min_df, hp.max_vocab_size)
        counts = {split: count_matrix(segments[split], vocab) for split in SPLITS}
        meta = {
            "corpus": corpus.name,
            "settings": self._settings(),
            "segments": stats,
            "nnz": {split: int(counts[split].nnz) for split in SPLITS},
            "vocab_size": len(vocab),
            "words": {split: float(counts[split].sum()) for split in SPLITS},
            "stopwords_source": self.preprocessor.stopwords_source,
        }
        log.info(
            "Bag-of-words %s in %.1fs: %s segments, vocabulary %d",
            corpus.name,
            time.perf_counter() - start,
            {s: stats[s]["segments"] for s in SPLITS},
            len(vocab),
        )
        return vocab, counts, meta

    def _check_segments(self, corpus: str, split: str, stats: dict[str, int]) -> None:
        """Empty segments are dropped with a count; a split left with no words at all is an error that says why."""
        empty, stop = stats["empty"], stats["only_stopwords"]
        why = f"{empty} of its {self.segment} segments were empty after preprocessing ({stop} held only stop words)"
        if stats["segments"] == 0:
            fix = (
                "set --data.remove_stopwords false"
                if stop
                else "check the text and the preprocessing settings (--data.drop_punctuation, --data.tokenizer)"
            )
            raise LMInputError(f"The {split} split of {corpus!r} has no words after preprocessing: {why}; {fix}.")
        if empty:
            log.info("Dropped from %s: %s.", split, why)

    # --- baseline -------------------------------------------------------------------------------------
    def unigram_log_probs(self) -> torch.Tensor:
        """Log-probabilities ``(vocab,)``, float64, of train's add-one-smoothed unigram distribution: the baseline to beat."""
        if self._unigram is None:
            totals = np.asarray(self.counts("train").sum(axis=0), dtype=np.float64).ravel() + 1.0
            self._unigram = torch.from_numpy(np.log(totals / totals.sum()))
        return self._unigram

    def unigram_perplexity(self, split: str = "valid") -> float:
        """Per-word perplexity of that distribution on the target (next) segments of ``split``'s evaluation streams."""
        targets = self.counts(split)[self.windows(split).grid(1).reshape(-1)]
        logp = self.unigram_log_probs().numpy()
        return float(np.exp(-(targets @ logp).sum() / targets.sum()))

    # --- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        super().setup(stage)
        if stage in (None, "fit"):
            b = batch_bytes(self.counts("train"), self.hparams.batch_size, self.hparams.bptt)
            log.info(
                "Bag-of-words batch of %d segments (%.1f distinct words each, vocabulary %d): %s as ids, offsets and counts, "
                "%s as a dense float32 matrix (%.0fx); targets cost the same again.",
                b["segments"],
                b["distinct_words_per_segment"],
                b["vocab_size"],
                _kib(b["sparse_bytes"]),
                _kib(b["dense_bytes"]),
                b["dense_over_sparse"],
            )

    def export_settings(self) -> dict:
        """What an export needs to turn a prompt into a bag as this datamodule does (``lm_lightning/export/commands.py``)."""
        hp = self.hparams
        return {
            "kind": "bags",
            "preprocessing": self.preprocessor.arguments(),
            "window": hp.window,
            "drop_punctuation": hp.drop_punctuation,
            "eval_batch_size": hp.eval_batch_size,
            "bptt": hp.bptt,
        }

    def prompt_bags(self) -> Bags:
        """The prompt as one segment of one stream."""
        words = Segmenter(self.preprocessor, "line", self.hparams.window, self.hparams.drop_punctuation).words(
            self.hparams.prompt
        )
        return as_bags(count_matrix([words], self.vocab), streams=1)

    def predict_dataloader(self) -> DataLoader:
        """The prompt as one segment; ``predict`` lists the likeliest words of the segment after it."""
        return DataLoader([Batch.prompt(self.prompt_bags(), 1)], batch_size=None)


def _kib(num: float) -> str:
    return f"{num / 1024:,.1f} KiB"
