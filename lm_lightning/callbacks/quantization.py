"""Quantization-aware finishing: the last part of training runs on fake-quantized int8/int4 weights.

Quantization-aware training (Jacob et al. 2018, arXiv:1712.05877) lets the weights adapt to the rounding they
will get in the export: the forward pass uses ``dequantize(quantize(w))``, the backward pass treats the rounding
as the identity (straight-through estimator). Only the last part of training does this: QAT works best as a
fine-tuning of weights already trained in float (Krishnamoorthi 2018, arXiv:1806.08342), and the early, large
updates then run at full speed.

What this file adds to torchao's fake-quantized modules:

* The fake-quantized modules (``lm_lightning/export/fake_quantization.py``), switched on in place at the scheduled
  step and off after fit.
* The schedule and ``qat/active`` in TensorBoard. The export step (``callbacks/export.py``) then writes the integer
  export this run trained for, with the same rule (``lm_lightning/export/quantization.py``), so it reproduces the
  fake-quantized model bit for bit.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import lightning as L
from torch import nn

from lm_lightning.callbacks.strategy import MemoryStrategy
from lm_lightning.errors import LMInputError
from lm_lightning.export.fake_quantization import disable_fake_quantization, enable_fake_quantization, quantized_weights
from lm_lightning.export.quantization import check_quantization

log = logging.getLogger(__name__)


class QuantizationAwareFinishing(MemoryStrategy):
    """Train the last part of the run on fake-quantized weights; the export step then writes int8/int4 weights.
    Without this callback, an integer export (``--export.bits 8``) is post-training quantization.

    Args:
        bits: 8 (int8, one scale per output channel) or 4 (int4, one scale per ``group_size`` inputs).
        group_size: Inputs sharing one int4 scale; must divide embedding_dim and hidden_dim (unused for int8).
        last_epochs: Fake-quantize during the last N epochs of ``trainer.max_epochs``. Give this or ``last_fraction``.
        last_fraction: Fake-quantize during this final share of the training steps, in (0, 1]; 0.25 when neither
            this nor ``last_epochs`` is given.
    """

    def __init__(
        self,
        bits: int = 8,
        group_size: int = 32,
        last_epochs: Optional[int] = None,
        last_fraction: Optional[float] = None,
    ) -> None:
        check_quantization(bits, group_size)
        if bits is None:
            raise LMInputError("bits must be 8 or 4 for quantization-aware training, got None.")
        if last_epochs is not None and last_fraction is not None:
            raise LMInputError(f"Give last_epochs ({last_epochs}) or last_fraction ({last_fraction}), not both.")
        if last_epochs is not None and (not isinstance(last_epochs, int) or last_epochs < 1):
            raise LMInputError(f"last_epochs must be at least 1 (0 would start QAT after the last epoch), got {last_epochs}.")
        if last_fraction is not None and not 0 < last_fraction <= 1:
            raise LMInputError(f"last_fraction must be in (0, 1] (the final share of training steps), got {last_fraction}.")
        self.bits, self.group_size = bits, group_size
        self.last_epochs = last_epochs
        self.last_fraction = 0.25 if last_epochs is None and last_fraction is None else last_fraction
        self.start_step: Optional[int] = None
        self.started_at: Optional[int] = None  # global step at which fake quantization was switched on

    name = "qat"
    trains_for_export = True

    def hparams(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size if self.bits == 4 else "none",
                "last_epochs": self.last_epochs, "last_fraction": self.last_fraction}  # fmt: skip

    def label(self) -> str:
        return f"QAT int{self.bits}" + (f" groups of {self.group_size}" if self.bits == 4 else "")

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if sum(isinstance(c, QuantizationAwareFinishing) for c in trainer.callbacks) > 1:
            raise LMInputError("QuantizationAwareFinishing is in trainer.callbacks twice: keep one.")
        network = getattr(pl_module, "network", None)
        if not isinstance(network, nn.Module):
            raise LMInputError(
                f"QuantizationAwareFinishing needs a LightningModule with a `network` module, got {type(pl_module).__name__}."
            )
        quantized_weights(network, self.bits, self.group_size)
        if self.last_epochs is not None:
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise LMInputError("last_epochs needs a finite --trainer.max_epochs: set it, or use last_fraction.")
            if self.last_epochs > trainer.max_epochs:
                raise LMInputError(
                    f"last_epochs ({self.last_epochs}) is more than trainer.max_epochs ({trainer.max_epochs}): QAT would "
                    "start before the first epoch; lower last_epochs."
                )
        self.started_at = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_fraction is None:
            return
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise LMInputError("last_fraction needs a finite run (--trainer.max_steps or --trainer.max_epochs).")
        # ceil: any positive fraction gets at least one step, so QAT never starts after the last one.
        self.start_step = int(total) - math.ceil(self.last_fraction * int(total))

    def _due(self, trainer: L.Trainer) -> bool:
        if self.last_epochs is not None:
            return trainer.current_epoch >= trainer.max_epochs - self.last_epochs
        return self.start_step is not None and trainer.global_step >= self.start_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # Checked at every batch, so a run resumed from a checkpoint saved during QAT switches it back on.
        if not self.active and self._due(trainer):
            names = enable_fake_quantization(pl_module.network, self.bits, self.group_size)
            self.started_at = trainer.global_step
            log.info(
                "QAT: int%d fake quantization on from step %d (epoch %d): %s",
                self.bits,
                trainer.global_step,
                trainer.current_epoch,
                ", ".join(names),
            )
        pl_module.log("qat/active", float(self.active))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            log.warning(
                "QAT never started (training stopped at step %d): an integer export is post-training quantization.",
                trainer.global_step,
            )

    def export_metadata(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "active": self.active, "start_step": self.started_at}

    def export_quantization(self) -> tuple[int, int]:
        return self.bits, self.group_size

    def probe(self, system: L.LightningModule) -> None:
        # estimate measures the costliest state: fake quantization on (its quantized copies of the weights).
        enable_fake_quantization(system.network, self.bits, self.group_size)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The trained module goes back to plain nn modules (deep-copyable, picklable as usual); the export step,
        # which runs before this, holds the quantized model.
        if stage == "fit" and isinstance(getattr(pl_module, "network", None), nn.Module):
            disable_fake_quantization(pl_module.network)
