"""Quantization-aware finishing: the last part of training runs on fake-quantized int8/int4 weights.

Quantization-aware training (Jacob et al. 2018, arXiv:1712.05877) lets the weights adapt to the rounding they
will get in the export: the forward pass uses ``dequantize(quantize(w))``, the backward pass treats the rounding
as the identity (straight-through estimator). Only the last part of training does this: QAT works best as a
fine-tuning of weights already trained in float (Krishnamoorthi 2018, arXiv:1806.08342), and the early, large
updates then run at full speed.

Built on torchao's ``FakeQuantizedEmbedding`` / ``FakeQuantizedLinear``; what this file adds:

* ``FakeQuantizedRNN``, mixed into each RNN type (``FakeQuantizedLSTM``, ``FakeQuantizedGRU``...): torchao has none.
  ``nn.RNNBase`` computes with its ``_flat_weights`` list (refreshed by ``RNNBase.__setattr__``), not with the
  attributes, so a parametrization or a swapped attribute can be silently ignored; the forward here puts the
  fake-quantized weights into that list for the duration of the call.
* ``FakeQuantizedEmbeddingBag``: torchao has no ``nn.EmbeddingBag`` either; the bag network (``networks/bag.py``)
  embeds its count-weighted segments with one. Its forward is ``nn.EmbeddingBag``'s ``F.embedding_bag`` call, every
  setting of the module kept, on the fake-quantized weight.
* Switching in place: module classes are swapped, as ``torch.nn.utils.parametrize`` does, instead of building
  new modules. Parameters (and so the optimizer's references), weight tying, hooks and ``state_dict`` keys are
  unchanged: checkpoints saved during QAT load into a plain ``LanguageModel`` (or ``BagLanguageModel``), a
  resumed run switches QAT back on from the step count, and pruning hooks (``torch.nn.utils.prune``) run first,
  so the pruned weight is the one that gets quantized.
* The schedule and ``qat/active`` in TensorBoard. The export step (``callbacks/export.py``) then writes the integer
  export this run trained for, with the same rule (``lm_lightning/export/quantization.py``), so it reproduces the
  fake-quantized model bit for bit.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from lm_lightning.callbacks.strategy import MemoryStrategy
from lm_lightning.errors import LMInputError
from lm_lightning.export.quantization import block_width, check_quantization, fake_quantize

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


class FakeQuantizedRNN:
    """Mixed into an ``nn.RNNBase`` class: its weight matrices (not biases) go through ``self.weight_fake_quantizer``.

    On cuDNN the substituted weights are not one contiguous buffer: torch warns once ("RNN module weights are not
    part of single contiguous chunk of memory") and packs them at each call, a copy the size of the RNN's weights.
    """

    weight_fake_quantizer: WeightFakeQuantizer

    def forward(self, input: Any, hx: Any = None) -> Any:
        # Sync the list with the attributes first (a pruning pre-hook may have just replaced them): otherwise
        # RNNBase's forward notices the change itself and rebuilds the list, dropping the substitution below.
        self._update_flat_weights()
        flat = self._flat_weights
        self._flat_weights = [
            self.weight_fake_quantizer(w) if n.startswith("weight") else w for n, w in zip(self._flat_weights_names, flat)
        ]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = flat


class FakeQuantizedEmbeddingBag(nn.EmbeddingBag):
    """``nn.EmbeddingBag`` whose weight is fake-quantized by ``self.weight_fake_quantizer``: one scale per word row
    (int8) or per ``group_size`` of its columns (int4), as the export stores the matrix."""

    weight_fake_quantizer: WeightFakeQuantizer

    def forward(
        self, input: torch.Tensor, offsets: Optional[torch.Tensor] = None, per_sample_weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        # self.weight is read here, after the forward pre-hooks: a pruned weight is quantized with its zeros.
        return nn.functional.embedding_bag(
            input,
            self.weight_fake_quantizer(self.weight),
            offsets,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.mode,
            self.sparse,
            per_sample_weights,
            self.include_last_offset,
            self.padding_idx,
        )


@functools.cache
def _fake_classes() -> dict[type, type]:
    """Plain module class -> its fake-quantized class (recurrent ones: ``_fake_rnn_class``). torchao is imported here,
    at the first use: 13 MB of resident memory that a run without QAT or an integer export does not need."""
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    return {nn.Embedding: FakeQuantizedEmbedding, nn.EmbeddingBag: FakeQuantizedEmbeddingBag, nn.Linear: FakeQuantizedLinear}


@functools.cache
def _fake_rnn_class(cls: type) -> type:
    """``FakeQuantized<cls>`` for an ``nn.RNNBase`` class, made once per class (so the swap back is by type)."""
    return type(f"FakeQuantized{cls.__name__}", (FakeQuantizedRNN, cls), {})


FakeQuantizedLSTM = _fake_rnn_class(nn.LSTM)  # the template's, by name for tests


def _fake_class(cls: type) -> type | None:
    if issubclass(cls, nn.RNNBase) and not issubclass(cls, FakeQuantizedRNN):
        return _fake_rnn_class(cls)
    return _fake_classes().get(cls)


def _plain_class(cls: type) -> type | None:
    if cls.__bases__[0] is FakeQuantizedRNN:  # (FakeQuantizedRNN, the plain class): made by _fake_rnn_class
        return cls.__bases__[1]
    return {fake: plain for plain, fake in _fake_classes().items()}.get(cls)


def quantized_weights(network: nn.Module, bits: int, group_size: int) -> dict[str, nn.Module]:
    """Modules whose weights get fake-quantized, by name; fails for modules with weights it cannot quantize or
    for an int4 ``group_size`` that does not divide a weight's input width."""
    modules = {}
    for name, module in network.named_modules():
        if _fake_class(type(module)) is not None or _plain_class(type(module)) is not None:
            modules[name] = module
            for attr, weight in module.named_parameters(recurse=False):
                if weight.dim() == 2:
                    block_width(weight.shape, bits, group_size, f"{name}.{attr.removesuffix('_orig')}")
        elif any(True for _ in module.parameters(recurse=False)):
            raise LMInputError(
                "QuantizationAwareFinishing quantizes nn.Embedding, nn.EmbeddingBag, nn.Linear and nn.RNNBase (LSTM, "
                f"GRU, RNN) weights; {name!r} is a {type(module).__name__}: use a network built from those or leave the "
                "callback out."
            )
    if not modules:
        raise LMInputError(
            "QuantizationAwareFinishing found no nn.Embedding, nn.EmbeddingBag, nn.Linear or nn.RNNBase in the network."
        )
    return modules


def enable_fake_quantization(network: nn.Module, bits: int, group_size: int = 32) -> list[str]:
    """Fake-quantize the weights of ``network`` in place (idempotent); returns the module names."""
    modules = quantized_weights(network, bits, group_size)
    for module in modules.values():
        module.__class__ = _fake_class(type(module)) or type(module)  # already fake-quantized: unchanged
        if not isinstance(module, (nn.RNNBase, nn.EmbeddingBag)):  # torchao's two classes have activation quantizers
            module.activation_fake_quantizer = None  # weight-only: activations stay in float
        module.weight_fake_quantizer = WeightFakeQuantizer(bits, group_size)
    return list(modules)


def disable_fake_quantization(network: nn.Module) -> None:
    """Back to the plain modules, same parameters."""
    for module in network.modules():
        plain = _plain_class(type(module))
        if plain is not None:
            module.__class__ = plain
            del module.weight_fake_quantizer
            module.__dict__.pop("activation_fake_quantizer", None)


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
