"""Parallel streams walked in truncated-BPTT windows (Mikolov 2010; Zaremba et al. 2014), and the batch they yield.

A split is one long sequence of *rows*: token ids for the token path, bag-of-words segments (CSR rows) for the bag
path. ``StreamWindows`` cuts it into ``batch_size`` parallel streams and walks them left to right in ``bptt``-long
windows, so window ``k+1`` of a stream continues exactly where window ``k`` ended and the model can carry its hidden
state across windows (word_language_model's ``batchify`` and ``get_batch``)::

    rows    = a b c d e f g h i j k l      batch_size=2, bptt=2
    streams = [a b c d e f]                window 0: inputs [[a b],[g h]]  targets [[b c],[h i]]
              [g h i j k l]                window 1: inputs [[c d],[i j]]  targets [[d e],[j k]] ...

Everything delicate about the layout is written here once, for both representations: which streams a DDP rank
reads (its own ``batch_size`` of ``batch_size * world_size``, so every rank has the same number of windows and no
rank waits at the end of an epoch), the micro-batch groups of gradient accumulation, the length check, ``len``.
A :class:`RowSequence` only says how to gather rows (:class:`TokenRows`, ``data/bag.py``'s ``BagRows``).

This is an ``IterableDataset`` on purpose: Lightning then leaves it alone instead of wrapping it in a
``DistributedSampler`` that would shuffle windows and break the hidden-state carry.

Micro-batches (``callbacks/accumulation.py``): a window can be yielded as ``k`` groups of ``batch_size / k``
consecutive streams, each with its own hidden state. Every group's loss is divided by the same ``divisor``, its
share of the whole window's target weight, so the mean of the ``k`` group losses (what Lightning accumulates) is
the loss of the whole window, exactly, also for a last window shorter than ``bptt`` and for bags whose groups hold
different numbers of words.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional, Protocol, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset

from lm_lightning.data.batch import Batch
from lm_lightning.errors import LMInputError

MicroBatchSize = Union[int, Callable[[], Optional[int]], None]


class RowSequence(Protocol):
    """A split as a sequence of rows that windows can be cut from."""

    unit: str  # what a row is, for error messages ("tokens", "non-empty segments")

    def __len__(self) -> int: ...

    def take(self, index: np.ndarray) -> Any:
        """The rows of a ``(streams, time)`` grid of row numbers, as one model input."""

    def weight(self, index: np.ndarray) -> float:
        """The target weight of those rows: how many tokens (or words) a loss over them averages over."""


class TokenRows:
    """Token ids (int32, typically memory-mapped from the cache): one row per token, each of weight 1."""

    unit = "tokens"

    def __init__(self, ids: np.ndarray | torch.Tensor) -> None:
        self.ids = ids.numpy() if isinstance(ids, torch.Tensor) else ids

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.ids[index], dtype=np.int64))

    def weight(self, index: np.ndarray) -> int:
        return int(index.size)


def batchify(ids: np.ndarray | torch.Tensor, num_streams: int) -> torch.Tensor:
    """Shape ``(num_streams, length)``; the tail that does not fill every stream is dropped (as in word_language_model)."""
    length = len(ids) // num_streams
    ids = torch.from_numpy(np.array(ids[: length * num_streams], dtype=np.int32))
    return ids.view(num_streams, length)


class StreamWindows(IterableDataset):
    """Consecutive :class:`Batch` windows of ``(batch_size, <= bptt)`` rows over parallel streams.

    Args:
        rows: The split (``TokenRows``, ``BagRows``, or token ids, which are wrapped in ``TokenRows``).
        batch_size: Parallel streams per rank.
        bptt: Window length in rows. The last window may be shorter, so evaluation covers every row.
        rank, world_size: This process's place among DDP processes.
        split: Name used in error messages.
        micro_batch_size: Streams per yielded micro-batch, or ``None`` for whole windows. A callable is asked again
            at every ``len()`` and ``iter()``, so a schedule can change it between epochs.
    """

    def __init__(
        self,
        rows: RowSequence | np.ndarray | torch.Tensor,
        batch_size: int,
        bptt: int,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        micro_batch_size: MicroBatchSize = None,
    ) -> None:
        if batch_size < 1 or bptt < 1:
            raise LMInputError(f"batch_size and bptt must be positive, got {batch_size} and {bptt}.")
        self.rows = TokenRows(rows) if isinstance(rows, (np.ndarray, torch.Tensor)) else rows
        needed = batch_size * world_size * (bptt + 1)
        if len(self.rows) < needed:
            flag = "batch_size" if split == "train" else "eval_batch_size"
            raise LMInputError(
                f"The {split} split has {len(self.rows)} {self.rows.unit}, fewer than one window needs (streams x devices x "
                f"(bptt + 1) = {batch_size} x {world_size} x {bptt + 1} = {needed}): lower --data.{flag} or --data.bptt, "
                "or use a larger corpus."
            )
        self.batch_size, self.bptt, self.micro_batch_size = batch_size, bptt, micro_batch_size
        self.length = len(self.rows) // (batch_size * world_size)  # rows per stream; the tail is dropped
        self.first_row = rank * batch_size  # this rank's streams are rows [first_row, first_row + batch_size)
        self._current_micro_batch_size()  # a bad value fails here, not at the first batch

    def _current_micro_batch_size(self) -> Optional[int]:
        size = self.micro_batch_size() if callable(self.micro_batch_size) else self.micro_batch_size
        if size is not None and (size < 1 or self.batch_size % size):
            raise LMInputError(f"micro_batch_size must divide batch_size ({self.batch_size}), got {size}.")
        return size

    def grid(self, start: int = 0, end: Optional[int] = None, streams: Optional[range] = None) -> np.ndarray:
        """Row numbers of positions ``start..end`` of this rank's streams (all of them by default), ``(streams, time)``."""
        streams = streams if streams is not None else range(self.batch_size)
        stream_ids = self.first_row + np.arange(streams.start, streams.stop)
        end = self.length if end is None else end
        return stream_ids[:, None] * self.length + np.arange(start, end)[None, :]

    def __len__(self) -> int:
        """Items per epoch: windows, or windows x micro-batches per window (what Lightning counts as batches)."""
        windows = math.ceil((self.length - 1) / self.bptt)
        size = self._current_micro_batch_size()
        return windows if size is None else windows * (self.batch_size // size)

    def __iter__(self):
        size = self._current_micro_batch_size()  # read once per epoch: all windows of an epoch are cut alike
        group = size or self.batch_size
        for start in range(0, self.length - 1, self.bptt):
            end = min(start + self.bptt, self.length - 1)
            inputs, targets = self.grid(start, end), self.grid(start + 1, end + 1)
            # Every group of the window divides by the same share of the window's weight (see the module docstring).
            divisor = self.rows.weight(targets) * group / self.batch_size if size else self.rows.weight(targets)
            for first in range(0, self.batch_size, group):
                rows = slice(first, first + group)
                yield Batch(self.rows.take(inputs[rows]), self.rows.take(targets[rows]), first, group, end - start, divisor)

    @property
    def num_targets(self) -> float:
        """Target weight per epoch (tokens or words): what perplexity averages over."""
        return self.rows.weight(self.grid(1))
