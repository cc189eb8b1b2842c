"""Tokens per second, through Lightning's own ``ThroughputMonitor``.

``ThroughputMonitor`` needs two functions to count a batch; for stream batches ``(inputs, targets)`` a sample is
a stream and an item is a token, so ``train/device/items_per_sec`` in TensorBoard is tokens per second.
This class only fixes those two functions so the callback can be named from the CLI or a YAML recipe.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def _streams(batch) -> int:
    return batch[0].size(0)


def _tokens(batch) -> int:
    return batch[0].numel()


class TokenThroughput(ThroughputMonitor):
    """Logs tokens/s (``*/items_per_sec``) and streams/s (``*/samples_per_sec``).

    Args:
        window_size: Batches averaged per reading (smaller shows numbers sooner on short runs).
    """

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=_streams, length_fn=_tokens, window_size=window_size)
