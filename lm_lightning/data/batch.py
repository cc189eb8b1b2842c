"""The typed records a batch travels in, read by name by the systems, callbacks, networks and benchmarks: a window of
the token or bag path (:class:`Batch`), and the bag path's sparse segments (:class:`Bags`). They live on the ground
floor of the data layer so that the networks can read them without importing the data modules."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class Batch(NamedTuple):
    """One window, or one stream group of a window, as the systems, callbacks and benchmarks read it (by name).

    ``inputs``/``targets`` are ``(streams, time)`` token ids or ``Bags``; ``first_stream`` is the first stream of
    the group (0 for a whole window), the key of the hidden state the group carries; ``divisor`` turns the summed
    negative log-likelihood of the targets into this batch's loss (the window's target tokens or words, times the
    group's share of the window).
    """

    inputs: Any
    targets: Any
    first_stream: int
    num_streams: int
    length: int
    divisor: float

    @property
    def num_items(self) -> int:
        """Target tokens (or segments) in the batch: what throughput counts."""
        return self.num_streams * self.length

    @classmethod
    def prompt(cls, inputs: Any, length: int) -> Batch:
        """A prompt for ``predict``: one stream of ``length`` tokens (or segments), no targets."""
        return cls(inputs, None, 0, 1, length, 0.0)


class Bags(NamedTuple):
    """A ``(streams, time)`` grid of segments as CSR rows over the vocabulary, row ``s * time + t`` for stream ``s``.

    Row ``r`` holds the word ids ``indices[offsets[r]:offsets[r + 1]]`` (distinct, sorted) with their ``counts``:
    exactly scipy's CSR ``indices``/``indptr``/``data`` and ``nn.EmbeddingBag``'s ``input``/``offsets``
    (``include_last_offset=True``)/``per_sample_weights``. Ids and offsets are int32 (half of int64; EmbeddingBag and
    indexing take them as they are), counts float32.
    """

    indices: torch.Tensor  # (nnz,) int32
    offsets: torch.Tensor  # (streams * time + 1,) int32
    counts: torch.Tensor  # (nnz,) float32
    streams: int

    @property
    def num_segments(self) -> int:
        return self.offsets.numel() - 1

    def segment_ids(self) -> torch.Tensor:
        """The row of each nonzero, ``(nnz,)``."""
        rows = torch.arange(self.num_segments, device=self.offsets.device, dtype=self.offsets.dtype)
        return torch.repeat_interleave(rows, self.offsets.diff(), output_size=self.indices.numel())

    def totals(self) -> torch.Tensor:
        """Words per segment, ``(streams * time,)``: differences of the running sum of counts at the row offsets."""
        # At least float32: a precision plugin may have cast the counts to bfloat16, whose running sums stop being
        # exact integers at 256 (float32's at 2**24).
        running = F.pad(self.counts.cumsum(0, dtype=torch.promote_types(self.counts.dtype, torch.float32)), (1, 0))
        return running[self.offsets[1:].long()] - running[self.offsets[:-1].long()]

    def words(self) -> torch.Tensor:
        """Words in all segments (the divisor of a per-word loss), in at least float32."""
        return self.counts.sum(dtype=torch.promote_types(self.counts.dtype, torch.float32))

    def to_dense(self, vocab_size: int) -> torch.Tensor:
        """``(streams, time, vocab)`` counts: for tests and tiny examples only (this is what the sparse form avoids)."""
        dense = torch.zeros(self.num_segments, vocab_size, dtype=self.counts.dtype, device=self.counts.device)
        dense[self.segment_ids().long(), self.indices.long()] = self.counts
        return dense.view(self.streams, -1, vocab_size)
