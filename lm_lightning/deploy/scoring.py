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
    """``-sum log softmax(logits)[target]`` over every position of ``logits`` (streams, time, vocab), in float64.

    One stream at a time: a float64 copy of a whole window's logits (streams x bptt x vocab) would be the largest
    allocation of a scoring run."""
    total = 0.0
    for row, target in zip(logits, targets):
        x = row.astype(np.float64)
        top = x.max(-1, keepdims=True)
        log_sum_exp = top[:, 0] + np.log(np.exp(x - top).sum(-1))
        total += float((log_sum_exp - x[np.arange(len(x)), target]).sum())
    return total
