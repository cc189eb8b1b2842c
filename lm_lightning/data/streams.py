"""Token streams for truncated backpropagation through time (Mikolov 2010; Zaremba et al. 2014).

The corpus is one long sequence of ids. ``batchify`` cuts it into ``batch_size`` parallel streams (rows), and
``StreamWindows`` walks them left to right in ``bptt``-long windows, so window ``k+1`` of a row continues
exactly where window ``k`` ended and the model can carry its hidden state across windows::

    ids   = a b c d e f g h i j k l     batch_size=2, bptt=2
    rows  = [a b c d e f]               window 0: x=[[a b],[g h]] y=[[b c],[h i]]
            [g h i j k l]               window 1: x=[[c d],[i j]] y=[[d e],[j k]] ...

Under DDP every rank takes its own ``batch_size`` rows of ``batch_size * world_size`` streams, so all ranks
see the same number of windows (no rank waits for another at the end of an epoch) and the streams stay
contiguous within a rank. This is an ``IterableDataset`` on purpose: Lightning then leaves it alone instead of
wrapping it in a ``DistributedSampler`` that would shuffle windows and break the hidden-state carry.

For gradient accumulation (``callbacks/accumulation.py``) each window can be yielded as ``k`` consecutive
micro-batches, the stream groups ``0..k-1`` of that window, each tagged with its first stream so the model keeps
one hidden state per group. Every micro-batch of a window has the same number of tokens, so the mean of their
losses is the loss of the whole window, and ``k`` groups of ``batch_size / k`` streams give exactly the gradient
of one batch of ``batch_size`` streams, also for a last window shorter than ``bptt``. Under DDP the groups are cut
from the rank's own rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset

from lm_lightning.errors import LMInputError


def batchify(ids: np.ndarray | torch.Tensor, num_streams: int) -> torch.Tensor:
    """Shape ``(num_streams, length)``; the tail that does not fill every stream is dropped (as in word_language_model)."""
    # int32 keeps the streams at half the memory of int64; windows are widened to long when yielded.
    length = len(ids) // num_streams
    ids = torch.from_numpy(np.array(ids[: length * num_streams], dtype=np.int32))
    return ids.view(num_streams, length)


class StreamWindows(IterableDataset):
    """Consecutive ``(input, target)`` windows of shape ``(batch_size, <= bptt)`` over parallel streams.

    Args:
        ids: The split as one sequence of token ids.
        batch_size: Parallel streams per rank.
        bptt: Window length (steps of backpropagation through time). The last window may be shorter, so
            evaluation covers every token.
        rank, world_size: This process's place among DDP processes.
        split: Name used in error messages.
        micro_batch_size: Streams per yielded micro-batch, or ``None`` for whole windows. With micro-batches the
            items are ``(input, target, first_stream)``. A callable is asked again at every ``len()`` and
            ``iter()``, so a schedule can change it between epochs.
    """

    def __init__(
        self,
        ids: np.ndarray | torch.Tensor,
        batch_size: int,
        bptt: int,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        micro_batch_size: Union[int, Callable[[], Optional[int]], None] = None,
    ) -> None:
        if batch_size < 1 or bptt < 1:
            raise LMInputError(f"batch_size and bptt must be positive, got {batch_size} and {bptt}.")
        needed = batch_size * world_size * (bptt + 1)
        if len(ids) < needed:
            raise LMInputError(
                f"The {split} split has {len(ids)} tokens, fewer than one window needs "
                f"(batch_size x world_size x (bptt + 1) = {needed}): lower --data.batch_size or --data.bptt, "
                "or use a larger corpus."
            )
        streams = batchify(ids, batch_size * world_size)
        self.streams = streams[rank * batch_size : (rank + 1) * batch_size]
        self.bptt = bptt
        self.micro_batch_size = micro_batch_size
        self._current_micro_batch_size()  # a bad value fails here, not at the first batch

    def _current_micro_batch_size(self) -> Optional[int]:
        size = self.micro_batch_size() if callable(self.micro_batch_size) else self.micro_batch_size
        batch_size = self.streams.size(0)
        if size is not None and (size < 1 or batch_size % size):
            raise LMInputError(f"micro_batch_size must divide batch_size ({batch_size}), got {size}.")
        return size

    def __len__(self) -> int:
        """Items per epoch: windows, or windows x micro-batches per window (what Lightning counts as batches)."""
        windows = math.ceil((self.streams.size(1) - 1) / self.bptt)
        size = self._current_micro_batch_size()
        return windows if size is None else windows * (self.streams.size(0) // size)

    def __iter__(self):
        size = self._current_micro_batch_size()  # read once per epoch: all windows of an epoch are cut alike
        length = self.streams.size(1)
        for start in range(0, length - 1, self.bptt):
            end = min(start + self.bptt, length - 1)
            if size is None:
                yield self.streams[:, start:end].long(), self.streams[:, start + 1 : end + 1].long()
                continue
            for first in range(0, self.streams.size(0), size):
                rows = self.streams[first : first + size]
                yield rows[:, start:end].long(), rows[:, start + 1 : end + 1].long(), first

    @property
    def num_tokens(self) -> int:
        """Target tokens per epoch (what perplexity averages over)."""
        return self.streams.size(0) * (self.streams.size(1) - 1)
