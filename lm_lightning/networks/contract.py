"""The network contract: what a network must do to be trained, measured, exported and run by this template.

A network is a plain ``nn.Module`` that knows nothing about Lightning. The systems (``systems/``) take it as an
argument, so a fork is one file and no subclass::

    python -m lm_lightning fit --model.network my_net.GRUNetwork --model.network.init_args.hidden_dim 512

(``vocab_size`` comes from the data; see tests/gru_model.py for a complete one.)

**Required.** ``forward(inputs, hidden=None) -> (logits, hidden)``: ``inputs`` is a ``(streams, time)`` tensor of
token ids (the bag path: :class:`~lm_lightning.data.batch.Bags`), ``logits`` is ``(streams, time, vocab_size)`` and
``hidden`` is whatever state the network carries to the next window: ``None`` means a zero state; tensors, or tuples
of them, which the system detaches between windows. The constructor takes ``vocab_size`` (linked from the data).

**Optional, each unlocking a memory strategy** (without it, that strategy stops the run before training with one
sentence naming what is missing):

* ``features(inputs, hidden=None) -> (features, hidden)`` and ``decoder: nn.Linear`` with
  ``forward(x, h) == (decoder(features(x, h)[0]), ...)``: the output layer apart, so the loss can be computed from the
  features without the full logits (the chunked loss).
* ``config``: a dict of the constructor's arguments, so an export records how to rebuild the network (when the
  system was built by the CLI its configuration is recorded anyway).
* ``embedding`` (an ``nn.Embedding``) and ``decoder``, read by the strategies that put adaptive layers in their place
  (adaptive input and softmax, ``networks/adaptive.py``): :func:`replace_module` records such a swap, so an export
  rebuilds the network as it was trained.

Everything else is found in the modules themselves, for any layer type that torch has a generic mechanism for: the
weights that pruning and quantization-aware training act on (``nn.Embedding``, ``nn.EmbeddingBag``, ``nn.Linear`` and
every ``nn.RNNBase``: LSTM, GRU, RNN), the embeddings that get sparse gradients, and time segments to recompute
(recomputation runs ``features`` or ``forward`` segment by segment; it needs nothing from the network).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from lm_lightning.errors import LMInputError


@runtime_checkable
class Network(Protocol):
    """The required part of the contract (see the module docstring)."""

    def forward(self, inputs: Any, hidden: Any = None) -> tuple[torch.Tensor, Any]: ...


def output_layer(network: nn.Module, strategy: str) -> nn.Linear:
    """The ``decoder`` of a network that offers ``features`` and ``decoder``, or one sentence naming what is missing."""
    decoder = getattr(network, "decoder", None)
    if "decoder" in getattr(network, "replaced_modules", {}):
        raise LMInputError(
            f"{strategy} computes the network's nn.Linear decoder its own way, and another memory strategy of this run has "
            f"put a {type(decoder).__name__} in its place (the adaptive softmax never builds the full logits either): "
            f"leave one of the two out."
        )
    if not callable(getattr(network, "features", None)) or not isinstance(decoder, nn.Linear):
        raise LMInputError(
            f"{strategy} needs a network with a features() method and an nn.Linear decoder (the optional output-layer "
            f"hook of lm_lightning/networks/contract.py); {type(network).__name__} lacks them: add them, or leave {strategy} out."
        )
    return decoder


def replace_module(network: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``network.<name>``, recorded in ``network.replaced_modules`` (name -> class path and
    the module's ``config``) so that an export rebuilds the network with it (``export/rebuild.py``)."""
    setattr(network, name, module)
    records = network.__dict__.setdefault("replaced_modules", {})
    records[name] = {"class_path": class_path(module), "init_args": dict(module.config)}


def class_path(network: nn.Module) -> str:
    return f"{type(network).__module__}.{type(network).__qualname__}"


def network_spec(network: nn.Module) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a network built in Python: what a checkpoint stores to rebuild it."""
    return {"class_path": class_path(network), "init_args": dict(getattr(network, "config", None) or {})}


def build_network(spec: dict[str, Any], vocab_size: Optional[int] = None) -> nn.Module:
    """A network from ``{"class_path", "init_args"}`` (a checkpoint's hyper-parameters written outside the CLI). Only a
    class that is already importable here is built, and it must be an ``nn.Module``."""
    path = str(spec.get("class_path", ""))
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise LMInputError(
            f"The network class {path!r} cannot be imported: install the package that defines it or put it on PYTHONPATH."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise LMInputError(f"The network class {path!r} is not an nn.Module: give --model.network the class of a network.")
    init_args = dict(spec.get("init_args") or {})
    if vocab_size is not None:
        init_args["vocab_size"] = vocab_size
    return cls(**init_args)
