"""Tokens per second, through Lightning's own ``ThroughputMonitor``.

``ThroughputMonitor`` needs two functions to count a batch; for a :class:`~lm_lightning.data.windows.Batch` a
sample is a stream and an item is a token (a segment on the bag-of-words path). Of everything it computes, two
training figures are logged, under names a reader does not have to decode: ``train/tokens_per_sec`` (all ranks
together) and ``train/batches_per_sec`` (batches as the loader yields them: micro-batches under
``MicroBatchAccumulation``). Its running totals (``train/time``, ``train/batches``, ``train/samples``,
``train/lengths``), the per-device copies and the validation-time figures only crowded TensorBoard's scalars.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

from lm_lightning.data.batch import Batch

TOKENS_PER_SEC = "train/tokens_per_sec"


def _streams(batch: Batch) -> int:
    return batch.num_streams


def _items(batch: Batch) -> int:
    return batch.num_items


class TokenThroughput(ThroughputMonitor):
    """Logs ``train/tokens_per_sec`` and ``train/batches_per_sec``; the last reading is ``tokens_per_sec``.

    Args:
        window_size: Batches averaged per reading (smaller shows numbers sooner on short runs).
    """

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=_streams, length_fn=_items, window_size=window_size)
        self.tokens_per_sec: Optional[float] = None

    def _compute(self, trainer: L.Trainer, iter_num: Optional[int] = None) -> None:
        if not trainer._logger_connector.should_update_logs or trainer.state.stage != RunningStage.TRAINING:
            return
        metrics = self._throughputs[RunningStage.TRAINING].compute()
        # Lightning adds the all-ranks figures only with several ranks; one rank's are then the whole.
        tokens = metrics.get("items_per_sec", metrics.get("device/items_per_sec"))
        batches = metrics.get("device/batches_per_sec")
        logged = {TOKENS_PER_SEC: tokens, "train/batches_per_sec": batches}
        logged = {k: v for k, v in logged.items() if v is not None}
        if tokens is not None:
            self.tokens_per_sec = float(tokens)
        if logged:
            trainer._logger_connector.log_metrics(logged, step=iter_num)
