"""What the token and bag-of-words data modules share: a lazily built vocabulary, a split as rows, and the stream windows.

A subclass says how text becomes rows (``_load_or_build`` and ``_rows``); this class cuts the rows into the
:class:`~lm_lightning.data.windows.StreamWindows` of each stage, per DDP rank, whole or as micro-batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from lm_lightning.data.splits import SPLITS
from lm_lightning.data.vocabulary import Vocabulary
from lm_lightning.data.windows import RowSequence, StreamWindows
from lm_lightning.errors import LMInputError

STAGE_SPLITS = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",), "predict": ()}


def default_cache_dir() -> str:
    return os.environ.get("LM_LIGHTNING_CACHE") or str(Path.home() / ".cache" / "lm_lightning" / "tokens")


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise LMInputError(f"--data.{name} must be a positive integer, got {value}: give 1 or more.")


class StreamDataModule(L.LightningDataModule):
    """Base of ``TokenDataModule`` and ``BagDataModule``; subclasses save ``batch_size``, ``eval_batch_size`` and
    ``bptt`` as hyper-parameters and implement ``_load_or_build`` and ``_rows``."""

    def __init__(self) -> None:
        super().__init__()
        self._vocab: Optional[Vocabulary] = None
        self.datasets: dict[str, StreamWindows] = {}
        self._micro_batch_size: Optional[Callable[[], Optional[int]]] = None

    # --- what a subclass provides ---------------------------------------------------------------------
    def _load_or_build(self) -> Vocabulary:
        """Read the corpus (or the cache) and return the vocabulary; afterwards ``_rows`` works."""
        raise NotImplementedError

    def _rows(self, split: str) -> RowSequence:
        """The split as rows (valid once ``_load_or_build`` has run)."""
        raise NotImplementedError

    # --- vocabulary and rows --------------------------------------------------------------------------
    @property
    def vocab(self) -> Vocabulary:
        """Built or loaded on first access: LightningCLI reads ``vocab_size`` before ``prepare_data`` runs."""
        if self._vocab is None:
            vocab = self._load_or_build()
            self._check_lengths()  # fail at start-up, not after the first epoch, when a split cannot fill one window
            self._vocab = vocab
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def rows(self, split: str) -> RowSequence:
        _ = self.vocab  # builds or loads the cache on first use
        return self._rows(split)

    def num_streams(self, split: str) -> int:
        return self.hparams.batch_size if split == "train" else self.hparams.eval_batch_size

    def windows(self, split: str, rank: int = 0, world_size: int = 1, micro_batch_size=None) -> StreamWindows:
        """The split's stream windows, as training or evaluation reads them."""
        return StreamWindows(
            self.rows(split), self.num_streams(split), self.hparams.bptt, rank, world_size, split, micro_batch_size
        )

    def _check_lengths(self) -> None:
        for split in SPLITS:
            StreamWindows(self._rows(split), self.num_streams(split), self.hparams.bptt, split=split)

    # --- Lightning hooks ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        _ = self.vocab

    def setup(self, stage: Optional[str] = None) -> None:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        for split in STAGE_SPLITS.get(stage or "", SPLITS):
            micro = self._micro_batch_size if split == "train" else None  # evaluation keeps whole windows
            self.datasets[split] = self.windows(split, rank, world, micro)

    def use_micro_batches(self, micro_batch_size: Callable[[], Optional[int]]) -> None:
        """Yield each training window as micro-batches of ``micro_batch_size()`` streams (gradient accumulation,
        see ``callbacks/accumulation.py``); the callable is asked at the start of every epoch."""
        self._micro_batch_size = micro_batch_size
        if "train" in self.datasets:
            self.datasets["train"].micro_batch_size = micro_batch_size

    def _loader(self, split: str) -> DataLoader:
        # batch_size=None: each dataset item already is a whole Batch. Its own generator: every new iterator draws a
        # worker seed, and from the global generator that draw would shift the dropout masks of a resumed run (the
        # first epoch's iterator is made before the RNG state is restored, later ones after; exact resume, issue 8).
        # Pinned (page-locked) batches on CUDA: Lightning then copies them to the GPU without blocking the host.
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(self.datasets[split], batch_size=None, generator=torch.Generator(), pin_memory=on_cuda)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
