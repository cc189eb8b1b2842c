"""Tokens per second, through Lightning's own ``ThroughputMonitor``.

``ThroughputMonitor`` needs two functions to count a batch; for a :class:`~lm_lightning.data.windows.Batch` a
sample is a stream and an item is a token (a segment on the bag-of-words path), so ``train/device/items_per_sec``
in TensorBoard is tokens per second. This class only fixes those two functions so the callback can be named from
the CLI or a YAML recipe.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor

from lm_lightning.data.windows import Batch


def _streams(batch: Batch) -> int:
    return batch.num_streams


def _items(batch: Batch) -> int:
    return batch.num_items


class TokenThroughput(ThroughputMonitor):
    """Logs tokens/s (``*/items_per_sec``) and streams/s (``*/samples_per_sec``).

    Args:
        window_size: Batches averaged per reading (smaller shows numbers sooner on short runs).
    """

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=_streams, length_fn=_items, window_size=window_size)
