"""Fake quantization in place: a network's weights run as ``dequantize(quantize(w))`` with the export's rule
(``quantization.py``), for quantization-aware training (``callbacks/quantization.py``) and undone on the copy an
export writes (``writer.py``).

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
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

from lm_lightning.errors import LMInputError
from lm_lightning.export.quantization import block_width, fake_quantize


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
