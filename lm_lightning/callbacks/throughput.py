"""Tokens per second, through Lightning's own ``ThroughputMonitor``.

``ThroughputMonitor`` needs two functions to count a batch; for a :class:`~lm_lightning.data.windows.Batch` a
sample is a stream and an item is a token (a segment on the bag-of-words path). Of everything it computes, two
training figures are logged, under names a reader does not have to decode: ``train/tokens_per_sec`` (all ranks
together) and ``train/batches_per_sec`` (batches as the loader yields them: micro-batches under
``MicroBatchAccumulation``). Its running totals (``train/time``, ``train/batches``, ``train/samples``,
``train/lengths``), the per-device copies and the validation-time figures only crowded TensorBoard's scalars.

On a GPU, ``ThroughputMonitor`` calls ``torch.cuda.synchronize()`` after every batch, micro-batches included, to read
the clock, so the host never runs ahead of the device. Here the clock is read (and the device waited for) only when a
figure is logged, and when validation starts and ends (so that its time is left out): batches in between are counted
on the host. A figure on a GPU is then the rate since the previous reading (a window of 2 readings), exact at both
ends; on CPU, where reading the clock waits for nothing, the monitor runs as Lightning wrote it.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_only

from lm_lightning.data.batch import Batch

TRAINING = RunningStage.TRAINING

TOKENS_PER_SEC = "train/tokens_per_sec"


def _streams(batch: Batch) -> int:
    return batch.num_streams


def _items(batch: Batch) -> int:
    return batch.num_items


class TokenThroughput(ThroughputMonitor):
    """Logs ``train/tokens_per_sec`` and ``train/batches_per_sec``; the last reading is ``tokens_per_sec``.

    Args:
        window_size: Batches averaged per reading (smaller shows numbers sooner on short runs). On a GPU each reading
            is the rate since the previous logged one instead (see the module's docstring).
    """

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=_streams, length_fn=_items, window_size=window_size)
        self.tokens_per_sec: Optional[float] = None
        self._paused_at: Optional[float] = None  # when validation started, on a GPU

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if _on_gpu(trainer):  # readings at logged steps only: each figure is the rate since the previous one
            self.kwargs = {**self.kwargs, "window_size": 2}
        super().setup(trainer, pl_module, stage)

    @torch.inference_mode()
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        if not _on_gpu(trainer) or _reading_due(trainer):
            return super()._update(trainer, pl_module, batch, iter_num)  # reads the clock (on a GPU: waits for it)
        if trainer.state.stage == TRAINING:  # counted, not timed: no wait for the device
            self._lengths[TRAINING] += self.length_fn(batch)
            self._samples[TRAINING] += self.batch_size_fn(batch)
            self._batches[TRAINING] += 1

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        if _on_gpu(trainer) and not trainer.sanity_checking and trainer.state.fn == "fit":
            torch.cuda.synchronize()  # the training so far is timed up to here, validation is not
            self._paused_at = time.perf_counter()
            throughput = self._throughputs[TRAINING]
            if self._batches.get(TRAINING, 0) > (throughput._batches.last or 0):
                throughput.update(
                    time=self._paused_at - self._t0s[TRAINING], batches=self._batches[TRAINING],
                    samples=self._samples[TRAINING], lengths=self._lengths[TRAINING],
                )  # fmt: skip
        super().on_validation_start(trainer, *args)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._paused_at is None:
            return super().on_validation_end(trainer, *args)
        torch.cuda.synchronize()
        self._t0s[TRAINING] += time.perf_counter() - self._paused_at  # the clock of training skips validation
        self._paused_at = None

    def _compute(self, trainer: L.Trainer, iter_num: Optional[int] = None) -> None:
        if not trainer._logger_connector.should_update_logs or trainer.state.stage != TRAINING:
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


def _on_gpu(trainer: L.Trainer) -> bool:
    return trainer.strategy.root_device.type == "cuda"  # where ThroughputMonitor synchronizes


def _reading_due(trainer: L.Trainer) -> bool:
    """A training figure is logged after this batch (``ThroughputMonitor.on_train_batch_end``'s own condition)."""
    if trainer.state.stage != TRAINING or trainer.fit_loop._should_accumulate():
        return False
    return trainer._logger_connector.should_update_logs
