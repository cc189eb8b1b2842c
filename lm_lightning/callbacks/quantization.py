"""Quantization-aware finishing: the last part of training runs on fake-quantized weights, then an int8/int4 export.

Quantization-aware training (Jacob et al. 2018, arXiv:1712.05877) lets the weights adapt to the rounding they
will get in the export: the forward pass uses ``dequantize(quantize(w))``, the backward pass treats the rounding
as the identity (straight-through estimator). Only the last part of training does this: QAT works best as a
fine-tuning of weights already trained in float (Krishnamoorthi 2018, arXiv:1806.08342), and the early, large
updates then run at full speed.

Built on torchao's ``FakeQuantizedEmbedding`` / ``FakeQuantizedLinear``; what this file adds:

* ``FakeQuantizedLSTM``: torchao has no LSTM. ``nn.LSTM`` computes with its ``_flat_weights`` list (refreshed by
  ``RNNBase.__setattr__``), not with the attributes, so a parametrization or a swapped attribute can be silently
  ignored; the forward here puts the fake-quantized weights into that list for the duration of the call.
* Switching in place: module classes are swapped, as ``torch.nn.utils.parametrize`` does, instead of building
  new modules. Parameters (and so the optimizer's references), weight tying, hooks and ``state_dict`` keys are
  unchanged: checkpoints saved during QAT load into a plain ``LanguageModel``, a resumed run switches QAT back
  on from the step count, and pruning hooks (``torch.nn.utils.prune``) run first, so the pruned weight is the
  one that gets quantized.
* The schedule, ``qat/active`` in TensorBoard, and at the end of fit the export of ``lm_lightning/export.py``
  with its size and test perplexity (``export/bytes``, ``export/test_ppl``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

from lm_lightning.errors import LMInputError
from lm_lightning.export import (
    block_width,
    check_quantization,
    export_model,
    fake_quantize,
    load_exported,
    network_spec,
    perplexity,
)

log = logging.getLogger(__name__)


class WeightFakeQuantizer(nn.Module):
    """The ``weight_fake_quantizer`` of torchao's fake-quantized modules, with the rule of the export."""

    def __init__(self, bits: int, group_size: int) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return f"int{self.bits}" + (f", group_size={self.group_size}" if self.bits == 4 else ", per output channel")


class FakeQuantizedLSTM(nn.LSTM):
    """``nn.LSTM`` whose weight matrices (not biases) are fake-quantized by ``self.weight_fake_quantizer``.

    On cuDNN the substituted weights are not one contiguous buffer: torch warns once ("RNN module weights are not
    part of single contiguous chunk of memory") and packs them at each call, a copy the size of the LSTM weights.
    """

    weight_fake_quantizer: WeightFakeQuantizer

    def forward(self, input: Any, hx: Any = None) -> Any:
        # Sync the list with the attributes first (a pruning pre-hook may have just replaced them): otherwise
        # nn.LSTM.forward notices the change itself and rebuilds the list, dropping the substitution below.
        self._update_flat_weights()
        flat = self._flat_weights
        self._flat_weights = [self.weight_fake_quantizer(w) if n.startswith("weight") else w for n, w in zip(self._flat_weights_names, flat)]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = flat


_FAKE = {nn.Embedding: FakeQuantizedEmbedding, nn.Linear: FakeQuantizedLinear, nn.LSTM: FakeQuantizedLSTM}
_PLAIN = {fake: plain for plain, fake in _FAKE.items()}


def quantized_weights(network: nn.Module, bits: int, group_size: int) -> dict[str, nn.Module]:
    """Modules whose weights get fake-quantized, by name; fails for modules with weights it cannot quantize or
    for an int4 ``group_size`` that does not divide a weight's input width."""
    modules = {}
    for name, module in network.named_modules():
        if type(module) in _FAKE or type(module) in _PLAIN:
            modules[name] = module
            for attr, weight in module.named_parameters(recurse=False):
                if weight.dim() == 2:
                    block_width(weight.shape, bits, group_size, f"{name}.{attr.removesuffix('_orig')}")
        elif any(True for _ in module.parameters(recurse=False)):
            raise LMInputError(
                f"QuantizationAwareFinishing quantizes nn.Embedding, nn.Linear and nn.LSTM weights; {name!r} is a "
                f"{type(module).__name__}: use a network built from those or leave the callback out."
            )
    if not modules:
        raise LMInputError("QuantizationAwareFinishing found no nn.Embedding, nn.Linear or nn.LSTM in the network.")
    return modules


def enable_fake_quantization(network: nn.Module, bits: int, group_size: int = 32) -> list[str]:
    """Fake-quantize the weights of ``network`` in place (idempotent); returns the module names."""
    modules = quantized_weights(network, bits, group_size)
    for module in modules.values():
        if type(module) in _FAKE:
            module.__class__ = _FAKE[type(module)]
        if not isinstance(module, nn.LSTM):
            module.activation_fake_quantizer = None  # weight-only: activations stay in float
        module.weight_fake_quantizer = WeightFakeQuantizer(bits, group_size)
    return list(modules)


def disable_fake_quantization(network: nn.Module) -> None:
    """Back to the plain modules, same parameters."""
    for module in network.modules():
        if type(module) in _PLAIN:
            module.__class__ = _PLAIN[type(module)]
            del module.weight_fake_quantizer
            module.__dict__.pop("activation_fake_quantizer", None)


class QuantizationAwareFinishing(Callback):
    """Train the last part of the run on fake-quantized weights, then export int8/int4 weights and report their size
    and test perplexity. Without this callback, ``lm_lightning.export.export_model`` on a trained network is
    post-training quantization.

    Args:
        bits: 8 (int8, one scale per output channel) or 4 (int4, one scale per ``group_size`` inputs).
        group_size: Inputs sharing one int4 scale; must divide embedding_dim and hidden_dim (unused for int8).
        last_epochs: Fake-quantize during the last N epochs of ``trainer.max_epochs``. Give this or ``last_fraction``.
        last_fraction: Fake-quantize during this final share of the training steps, in (0, 1]; 0.25 when neither
            this nor ``last_epochs`` is given.
        export: At the end of fit, write the export and report its size and test perplexity.
        export_dir: Folder for the export; default ``<log_dir>/export-int<bits>``.
    """

    def __init__(
        self,
        bits: int = 8,
        group_size: int = 32,
        last_epochs: Optional[int] = None,
        last_fraction: Optional[float] = None,
        export: bool = True,
        export_dir: Optional[str] = None,
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
        self.export, self.export_dir = export, export_dir
        self.start_step: Optional[int] = None
        self.started_at: Optional[int] = None  # global step at which fake quantization was switched on
        self.report: Optional[dict] = None  # export report + "test_ppl", after fit

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
            raise LMInputError(f"QuantizationAwareFinishing needs a LightningModule with a `network` module, got {type(pl_module).__name__}.")
        quantized_weights(network, self.bits, self.group_size)
        if self.export:
            network_spec(network)
        if self.last_epochs is not None:
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise LMInputError("last_epochs needs a finite --trainer.max_epochs: set it, or use last_fraction.")
            if self.last_epochs > trainer.max_epochs:
                raise LMInputError(
                    f"last_epochs ({self.last_epochs}) is more than trainer.max_epochs ({trainer.max_epochs}): QAT would "
                    "start before the first epoch; lower last_epochs."
                )
        self.started_at, self.report = None, None

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
            log.info("QAT: int%d fake quantization on from step %d (epoch %d): %s", self.bits, trainer.global_step, trainer.current_epoch, ", ".join(names))
        pl_module.log("qat/active", float(self.active))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.export or not trainer.is_global_zero:
            return
        if not self.active:
            log.warning("QAT never started (training stopped at step %d): the export is post-training quantization.", trainer.global_step)
        folder = (Path(self.export_dir) if self.export_dir else Path(trainer.log_dir or trainer.default_root_dir) / f"export-int{self.bits}").absolute()
        datamodule = trainer.datamodule
        metadata = {"qat": self.active, "qat_start_step": self.started_at, "global_step": trainer.global_step, "epoch": trainer.current_epoch}
        report = export_model(pl_module.network, folder, self.bits, self.group_size, getattr(datamodule, "vocab", None), metadata)
        report["test_ppl"] = self._test_perplexity(trainer, folder, pl_module.device)
        self.report = report
        metrics = {"export/bytes": float(report["bytes"])}
        if report["test_ppl"] is not None:
            metrics["export/test_ppl"] = report["test_ppl"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        ppl = f"{report['test_ppl']:.2f}" if report["test_ppl"] is not None else "n/a (no test split)"
        print(
            f"Exported int{self.bits} model to {folder}: {report['bytes']:,} bytes "
            f"({report['bytes'] / report['float32_bytes']:.0%} of float32 weights), test perplexity {ppl}"
        )

    def _test_perplexity(self, trainer: L.Trainer, folder: Path, device: torch.device) -> Optional[float]:
        """Perplexity of the *loaded* export on the datamodule's test split (``limit_test_batches`` applies)."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "test_dataloader"):
            return None
        datamodule.setup("test")
        batches = datamodule.test_dataloader()
        limit = trainer.limit_test_batches
        max_batches = limit if isinstance(limit, int) else (None if limit >= 1.0 else int(len(batches) * limit))
        if max_batches == 0:  # --trainer.limit_test_batches 0: no test evaluation wanted
            return None
        return perplexity(load_exported(folder).to(device), batches, max_batches)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The trained module goes back to plain nn modules (deep-copyable, picklable as usual); the export holds
        # the quantized model.
        if stage == "fit" and isinstance(getattr(pl_module, "network", None), nn.Module):
            disable_fake_quantization(pl_module.network)
