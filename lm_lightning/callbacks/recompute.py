"""Activation recomputation: the network runs over each training window in time segments whose internals are
recomputed in the backward pass instead of kept (a memory strategy, ``torch.utils.checkpoint``).

Chen et al. (2016), "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174): keep only each segment's
input and the hidden state between segments; the backward pass re-runs one segment at a time, so it holds one
segment's activations (embedding, every recurrent layer's gates, dropout masks) instead of the window's, for one more
forward pass of the network. The segments are cut in time, so the hidden state flows from one to the next exactly as
in the plain pass, and any network that keeps the contract (``networks/contract.py``) can be segmented: nothing is
asked of it beyond ``forward`` (or ``features``, when the chunked loss runs too).

Dropout masks are drawn segment by segment (the same distribution as one draw per window), and ``checkpoint``
restores the random state before each recomputation (the CPU generator and the CUDA generator of the inputs' device),
so the backward pass redraws exactly the masks of the forward. On a GPU that holds only for masks drawn from those
generators: cuDNN draws a stacked ``nn.RNNBase``'s dropout between layers from a state of its own, which nothing
restores. The template's LSTM (``networks/lstm.py: StackedLSTM``) draws those masks with ``F.dropout`` instead; any
other recurrent module with dropout between layers is refused on CUDA, in one sentence, before the first step.
Only training runs segmented: evaluation keeps no activations for backward anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lm_lightning.callbacks.strategy import MemoryStrategy
from lm_lightning.errors import LMInputError
from lm_lightning.networks.lstm import StackedLSTM


def check_recomputable_dropout(network: nn.Module, device: torch.device) -> None:
    """On CUDA, one sentence for a recurrent module whose dropout between layers cuDNN draws (the recomputation
    would redraw other masks: wrong gradients, silently); on CPU torch's generator draws them, which is restored."""
    if device.type != "cuda":
        return
    for name, module in network.named_modules():
        stacked_with_dropout = isinstance(module, nn.RNNBase) and module.num_layers > 1 and module.dropout > 0
        if stacked_with_dropout and not isinstance(module, StackedLSTM):
            raise LMInputError(
                f"Recomputation cannot redraw the dropout between the layers of {name} ({type(module).__name__}, "
                f"num_layers {module.num_layers}, dropout {module.dropout:g}) on CUDA, where cuDNN draws it from a state "
                "that checkpoint does not restore, so its gradients would be wrong: run it as one single-layer module per "
                "layer with F.dropout between them (as networks/lstm.py: StackedLSTM does), set its dropout to 0, or leave "
                "Recomputation out."
            )


class SegmentedRecomputation:
    """The system's ``window_runner``: ``step`` over ``segments`` time slices of the window, each checkpointed."""

    def __init__(self, segments: int) -> None:
        self.segments = segments

    def __call__(self, step: Callable[..., tuple[torch.Tensor, Any]], inputs: Any, hidden: Any) -> tuple[torch.Tensor, Any]:
        if not torch.is_grad_enabled():
            return step(inputs, hidden)
        outputs = []
        for segment in inputs.tensor_split(min(self.segments, inputs.size(1)), dim=1):
            output, hidden = checkpoint(step, segment, hidden, use_reentrant=False)
            outputs.append(output)
        return torch.cat(outputs, dim=1), hidden


class Recomputation(MemoryStrategy):
    """Recompute the network's activations in the backward pass, ``segments`` time segments per training window,
    instead of keeping them: less activation memory for one more forward pass. Token networks (ids in time).

    Args:
        segments: Time segments per window; the backward pass holds one segment's activations at a time.
    """

    name = "recompute"

    def __init__(self, segments: int = 5) -> None:
        if not isinstance(segments, int) or segments < 1:
            raise LMInputError(f"Recomputation segments must be a positive integer, got {segments}: give e.g. 5.")
        self.segments = segments

    def label(self) -> str:
        return f"recompute {self.segments}"

    def hparams(self) -> dict[str, int]:
        return {"segments": self.segments}

    def apply(self, system: nn.Module) -> None:
        if not system.token_inputs:
            raise LMInputError(
                "Recomputation cuts token windows in time; the bag path's windows are sparse segments: leave it out "
                "of a bag-of-words run."
            )
        system.window_runner = SegmentedRecomputation(self.segments)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_recomputable_dropout(pl_module.network, trainer.strategy.root_device)
        super().setup(trainer, pl_module, stage)
