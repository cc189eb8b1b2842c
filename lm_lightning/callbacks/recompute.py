"""Activation recomputation: the network runs over each training window in time segments whose internals are
recomputed in the backward pass instead of kept (a memory strategy, ``torch.utils.checkpoint``).

Chen et al. (2016), "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174): keep only each segment's
input and the hidden state between segments; the backward pass re-runs one segment at a time, so it holds one
segment's activations (embedding, every recurrent layer's gates, dropout masks) instead of the window's, for one more
forward pass of the network. The segments are cut in time, so the hidden state flows from one to the next exactly as
in the plain pass, and any network that keeps the contract (``networks/contract.py``) can be segmented: nothing is
asked of it beyond ``forward`` (or ``features``, when the chunked loss runs too).

Dropout masks are drawn segment by segment (the same distribution as one draw per window), and ``checkpoint``
restores the random state before each recomputation, so the backward pass redraws exactly the masks of the forward.
Only training runs segmented: evaluation keeps no activations for backward anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lm_lightning.callbacks.strategy import MemoryStrategy
from lm_lightning.errors import LMInputError


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
