"""Perplexity in numpy: the windows of ``data/windows.py``'s ``StreamWindows`` and the sum of ``evaluation.perplexity``,
for a process without torch.

The layout is ``StreamWindows(ids, streams, bptt)``'s on one rank, whole windows: the ids cut into ``streams`` rows
(the tail that fills no row dropped), walked left to right in ``bptt``-long windows, the last one shorter, each
window's targets its inputs moved one token on. The perplexity is ``exp`` of the summed cross-entropy over the summed
target count, the state carried from window to window by the caller. ``tests/test_deploy.py`` holds both equal to
the torch path's.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def stream_windows(ids: np.ndarray, streams: int, bptt: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) int64 arrays of shape (streams, <= bptt), window after window."""
    length = len(ids) // streams
    grid = np.asarray(ids[: length * streams], dtype=np.int64).reshape(streams, length)
    for start in range(0, length - 1, bptt):
        end = min(start + bptt, length - 1)
        yield grid[:, start:end], grid[:, start + 1 : end + 1]


def summed_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """``-sum log softmax(logits)[target]`` over every position of ``logits`` (streams, time, vocab).

    One stream at a time, the exponentials in float32 (shifted by the row's maximum, so they lie in (0, 1]) and their
    sums and the total in float64: a float64 copy of the logits cost twice the time and the memory of the exponentials
    and changed the perplexity by less than 1e-7 relative."""
    total = 0.0
    for row, target in zip(logits, targets):
        top = row.max(-1, keepdims=True)
        log_sum_exp = top[:, 0].astype(np.float64) + np.log(np.exp(row - top).sum(-1, dtype=np.float64))
        total += float((log_sum_exp - row[np.arange(len(row)), target]).sum())
    return total


def stream_groups(streams: int, bptt: int, vocab_size: int, max_bytes: int) -> list[slice]:
    """The streams in groups whose window of float32 logits stays under ``max_bytes`` (at least one stream a group):
    each group carries its own state, exactly as if the window ran whole, at a fraction of the memory."""
    size = max(1, min(streams, max_bytes // (4 * bptt * vocab_size)))
    return [slice(first, min(first + size, streams)) for first in range(0, streams, size)]
