"""Gradient accumulation over stream micro-batches: the activation memory of ``micro_batch_size`` streams, the
gradient of ``--data.batch_size`` streams.

Lightning already accumulates: with ``trainer.accumulate_grad_batches = k`` it divides each batch's loss by ``k``
and steps the optimizer every ``k`` batches (and at the end of an epoch), and its ``GradientAccumulationScheduler``
changes ``k`` from epoch to epoch. For a recurrent language model that alone is not the same training: its
consecutive batches are consecutive windows of the same streams, so accumulating them trains on ``k`` windows per
step, ``k`` times fewer steps per epoch, and does not lower the memory of a window of ``batch_size`` streams.

What this callback adds is the data side. Each ``bptt`` window is yielded as ``k`` micro-batches, the stream
groups ``0..k-1`` of that window (``data/windows.py``), and the system keeps one hidden state per group
(``systems/base.py``). Every group divides its loss by the same share of the window's tokens (words, for bags), so
``(1/k) * sum of the group losses`` is the window's per-token loss, and the step Lightning takes after the ``k``
micro-batches is the step of one batch of ``batch_size`` streams: parameters agree to float rounding, gradient clipping
included, also when a schedule
changes ``k`` between epochs and when the last window is shorter than ``bptt`` (``tests/test_accumulation.py``).
What autograd saves for backward scales with the streams in flight, so activation memory drops about ``k`` times.

Counting: Lightning counts micro-batches, so the progress bar, ``len(train_dataloader)`` and an integer
``--trainer.limit_train_batches`` are in micro-batches, while ``log_every_n_steps``, ``global_step`` and
``trainer.estimated_stepping_batches`` stay in optimizer steps (one per window, as without accumulation).
``train/loss`` is the mean over the window's micro-batches, i.e. the loss of the whole effective batch.
Dropout masks are drawn per micro-batch, so with dropout the runs agree in distribution, not bit for bit.
"""

from __future__ import annotations

import math
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lm_lightning.callbacks.strategy import MemoryStrategy
from lm_lightning.errors import LMInputError


class MicroBatchAccumulation(MemoryStrategy):
    """Split each training batch of streams into micro-batches and accumulate their gradients.

    Logs ``accumulation/micro_batch_size`` and ``accumulation/steps`` once per epoch. Validation and test keep
    whole windows of ``--data.eval_batch_size`` streams. Under DDP the sizes are per device, like ``batch_size``.

    Args:
        micro_batch_size: Streams per forward/backward pass; must divide ``--data.batch_size``, which stays the
            effective batch (accumulation steps = batch_size / micro_batch_size).
        schedule: Micro-batch sizes from later epochs on, ``{epoch: micro_batch_size}`` with epochs counted
            from 0, e.g. ``{5: 16}``. Only memory and speed change with it, not the gradients: the effective
            batch is always ``batch_size``. Turns on ``--trainer.reload_dataloaders_every_n_epochs 1`` so that
            Lightning re-counts the micro-batches of each epoch.
    """

    def __init__(self, micro_batch_size: int, schedule: Optional[dict[int, int]] = None) -> None:
        super().__init__()
        # Checked in setup(), next to batch_size: LightningCLI wraps any error raised while it builds the
        # callback list in a long "does not validate against any of the Union subtypes" message.
        self.sizes = {0: micro_batch_size, **(schedule or {})}
        self._trainer: Optional[L.Trainer] = None
        self._scheduler: Optional[GradientAccumulationScheduler] = None
        self._batch_size = 0

    name = "micro_batches"

    def hparams(self) -> dict[str, object]:
        later = {epoch: size for epoch, size in self.sizes.items() if epoch}
        return {"micro_batch_size": self.sizes[0], "schedule": str(later) if later else "none"}

    def label(self) -> str:
        return f"micro-batches of {self.sizes[0]}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check(trainer, pl_module)
        self._trainer = trainer
        # Lightning's own scheduler sets trainer.accumulate_grad_batches at every epoch start; the data below
        # reads its factor for the same epoch, so the two cannot drift apart.
        self._scheduler = GradientAccumulationScheduler({epoch: self._batch_size // size for epoch, size in self.sizes.items()})
        # Set now, not only at the first epoch start: configure_optimizers may read estimated_stepping_batches.
        trainer.accumulate_grad_batches = self.steps(trainer.current_epoch)
        trainer.datamodule.use_micro_batches(self.current_micro_batch_size)
        if len(set(self.sizes.values())) > 1 and trainer.reload_dataloaders_every_n_epochs != 1:
            # Lightning counts an epoch's batches when it loads the train dataloader, and that happens before
            # on_train_epoch_start (fit_loop.py: setup_data); reloading every epoch re-counts them with the new k.
            rank_zero_info(
                "MicroBatchAccumulation: the schedule changes the micro-batch count, so the train dataloader is reloaded "
                "every epoch."
            )
            trainer.reload_dataloaders_every_n_epochs = 1

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Everything that would otherwise fail, or silently train something else, after the first step."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "use_micro_batches"):
            raise LMInputError(
                "MicroBatchAccumulation needs a datamodule that yields stream micro-batches "
                "(lm_lightning.data.TokenDataModule or BagDataModule)."
            )
        if trainer.accumulate_grad_batches != 1:
            raise LMInputError(
                f"--trainer.accumulate_grad_batches {trainer.accumulate_grad_batches} conflicts with MicroBatchAccumulation, "
                "which sets it to batch_size / micro_batch_size: remove --trainer.accumulate_grad_batches."
            )
        others = [
            type(c).__name__
            for c in trainer.callbacks
            if isinstance(c, (GradientAccumulationScheduler, MicroBatchAccumulation)) and c is not self
        ]
        if others:
            raise LMInputError(
                f"MicroBatchAccumulation already schedules gradient accumulation: remove the {others[0]} callback and use "
                "MicroBatchAccumulation's schedule."
            )
        if not pl_module.automatic_optimization:
            raise LMInputError(
                "MicroBatchAccumulation relies on Lightning's automatic optimization: remove it or set "
                "automatic_optimization = True."
            )
        self._batch_size = batch_size = datamodule.hparams.batch_size
        for epoch, size in self.sizes.items():
            where = f" (schedule, epoch {epoch})" if epoch else ""
            if not isinstance(epoch, int) or epoch < 0:
                raise LMInputError(f"MicroBatchAccumulation schedule keys are epochs counted from 0, got {epoch!r}.")
            if not isinstance(size, int) or size < 1:
                raise LMInputError(f"MicroBatchAccumulation micro_batch_size must be a positive integer, got {size!r}{where}.")
            if batch_size % size:  # also catches size > batch_size
                divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
                raise LMInputError(
                    f"MicroBatchAccumulation micro_batch_size {size}{where} must divide --data.batch_size {batch_size}: use "
                    f"one of {divisors}."
                )

    def micro_batch_size(self, epoch: int) -> int:
        """Streams per micro-batch in ``epoch``."""
        return self._batch_size // self.steps(epoch)

    def steps(self, epoch: int) -> int:
        """Micro-batches accumulated per optimizer step in ``epoch``."""
        assert self._scheduler is not None, "setup() has not run"
        return self._scheduler.get_accumulate_grad_batches(epoch)

    def current_micro_batch_size(self) -> int:
        """Asked by the dataset at every ``len()``/``iter()``: the epoch Lightning is about to run."""
        assert self._trainer is not None
        return self.micro_batch_size(self._trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._scheduler is not None
        self._scheduler.on_train_epoch_start(trainer, pl_module)
        steps, size = trainer.accumulate_grad_batches, self.micro_batch_size(trainer.current_epoch)
        pl_module.log_dict(
            {"accumulation/micro_batch_size": float(size), "accumulation/steps": float(steps)}, on_step=False, on_epoch=True
        )
        cut = trainer.num_training_batches % steps if math.isfinite(trainer.num_training_batches) else 0
        if cut:
            rank_zero_warn(
                f"MicroBatchAccumulation: {trainer.num_training_batches} training batches cut the last window after {cut} of its "
                f"{steps} micro-batches, so its optimizer step sees {cut * size} of {self._batch_size} streams: make "
                f"--trainer.limit_train_batches a multiple of {steps} for exact steps."
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._scheduler is not None:
            trainer.accumulate_grad_batches = 1  # a later fit() with this trainer starts from Lightning's default
