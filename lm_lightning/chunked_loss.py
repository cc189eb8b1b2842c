"""Chunked linear + cross-entropy: the loss from the LSTM outputs without ever holding the full logits.

With a large vocabulary the decoder's logits are by far the largest activation: one 20 x 35 window at WikiText-2's
33,278 words is 93 MB of float32 logits, the log-softmax that cross-entropy saves for backward as much again, and
their gradient as much in the backward pass. Computed ``chunk_size`` tokens at a time, only one chunk's logits exist
at once.

torch 2.13 does the work: ``torch.nn.functional.linear_cross_entropy`` with an explicit ``batch_chunk_size``
computes each chunk's loss *and* its gradients in the forward pass, so nothing of size vocabulary x tokens survives
it. Measured here (one thread, 700 tokens, 200 -> 33,278): the plain path 876 ms per forward + backward, chunks of
256 tokens 539 ms (1.6x faster: the 93 MB buffers are never allocated), 128 or 512 tokens ~580 ms, and torch's
automatic chunking 2,776 ms (3x slower; so there is no "auto" default here). Where torch lacks the function, the
fallback recomputes each chunk's logits in the backward pass (``torch.utils.checkpoint``): as little memory, ~1.2x
the plain path's time.

What this file adds to torch: the decoder's weight as the decoder itself would use it -- pruning's forward pre-hook
(``weight = weight_orig * mask``) and QAT's fake quantizer (torchao's ``FakeQuantizedLinear``) -- so the chunked loss
composes with every memory strategy, tied weights included. Under bf16-mixed the chunked loss runs in float32: torch's
op is outside autocast's lists, and its bfloat16 path sums the loss in bfloat16 (a 0.5% error on a 700-token window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Tokens per chunk that the CLI offers by default (configs/memory/chunked_loss.yaml): fastest of 128/256/512 here.
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
