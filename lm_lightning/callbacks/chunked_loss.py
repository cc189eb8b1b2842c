"""Chunked loss: the loss from the network's features in chunks of tokens, never the full logits (a memory strategy).

With a large vocabulary the decoder's logits are by far the largest activation (tokens x vocabulary floats), the
log-softmax that cross-entropy saves for backward as much again, and their gradient as much in the backward pass.
Computed ``chunk_size`` tokens at a time, only one chunk's logits exist at once; on CPU it is also faster at large
vocabularies (fewer bytes through memory; docs/memory.md has the figures).

torch does the work: ``torch.nn.functional.linear_cross_entropy`` with an explicit ``batch_chunk_size`` computes each
chunk's loss *and* its gradients in the forward pass, so nothing of size vocabulary x tokens survives it (torch's
automatic chunking is much slower, so there is no "auto" default here). Where torch lacks the function, the fallback
recomputes each chunk's logits in the backward pass (``torch.utils.checkpoint``).

What this file adds to torch: the decoder's weight as the decoder itself would use it -- pruning's forward pre-hook
(``weight = weight_orig * mask``) and QAT's fake quantizer -- so the chunked loss composes with every memory strategy,
tied weights included. Under bf16-mixed the chunked loss runs in float32: torch's op is outside autocast's lists, and
its bfloat16 path sums the loss in bfloat16. The network offers its output layer through the contract's optional
hook (``features`` and ``decoder``, ``networks/contract.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lm_lightning.callbacks.strategy import MemoryStrategy
from lm_lightning.errors import LMInputError
from lm_lightning.networks.contract import output_layer

# Tokens per chunk by default (configs/memory/chunked_loss.yaml): the fastest of 128/256/512 on the recipes here.
DEFAULT_CHUNK_SIZE = 256


def decoder_weights(decoder: nn.Linear, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias ``decoder(x)`` would multiply by, with their autograd history.

    Calling the decoder on no tokens runs its forward pre-hooks (``torch.nn.utils.prune`` sets ``weight`` from
    ``weight_orig`` and the mask there); a fake-quantized decoder (QAT) quantizes in its forward, done here likewise.
    """
    decoder(like.new_empty(0, decoder.in_features))
    weight = decoder.weight
    quantizer = getattr(decoder, "weight_fake_quantizer", None)
    if quantizer is not None:
        weight = quantizer(weight)
    return weight, decoder.bias


def chunked_nll(features: torch.Tensor, decoder: nn.Linear, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` (..., ) under ``decoder(features)`` (..., in) -> (..., vocab),
    computed ``chunk_size`` tokens at a time. Equal to ``evaluation.nll(decoder(features), targets)`` in float32."""
    x = features.reshape(-1, features.size(-1)).float()
    y = targets.reshape(-1)
    weight, bias = decoder_weights(decoder, x)
    weight, bias = weight.float(), None if bias is None else bias.float()
    with torch.autocast(x.device.type, enabled=False):
        if hasattr(F, "linear_cross_entropy"):
            options = nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size)
            return F.linear_cross_entropy(x, weight, y, linear_bias=bias, reduction="sum", options=options)
        return sum(
            checkpoint(_chunk_nll, x[i : i + chunk_size], weight, bias, y[i : i + chunk_size], use_reentrant=False)
            for i in range(0, x.size(0), chunk_size)
        )


def _chunk_nll(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(x, weight, bias), y, reduction="sum")


class ChunkedNLL:
    """The system's ``loss_head``: the summed loss from the features through the network's decoder, in chunks."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size

    def __call__(self, network: nn.Module, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_nll(features, network.decoder, targets, self.chunk_size)


class ChunkedLoss(MemoryStrategy):
    """Compute the loss ``chunk_size`` tokens at a time from the network's features, never holding the full logits
    (same loss and gradients as the plain path). Token networks with the contract's output-layer hook.

    Args:
        chunk_size: Tokens per chunk: smaller holds less, too small runs slower.
    """

    name = "chunked_loss"

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise LMInputError(f"ChunkedLoss chunk_size must be a positive number of tokens, got {chunk_size}: give e.g. 256.")
        self.chunk_size = chunk_size

    def label(self) -> str:
        return f"chunked loss {self.chunk_size}"

    def hparams(self) -> dict[str, int]:
        return {"chunk_size": self.chunk_size}

    def apply(self, system: nn.Module) -> None:
        if not system.token_inputs:
            raise LMInputError("ChunkedLoss scores next tokens; the bag path scores next bags of words: leave it out of a bag-of-words run.")
        output_layer(system.network, "ChunkedLoss")
        system.loss_head = ChunkedNLL(self.chunk_size)
