"""The loss and the perplexity, written once for every path: the systems train with :func:`nll`, and
:func:`perplexity` scores any network over stream windows (exports, benchmarks, tests) with the same function.

Perplexity is ``exp`` of the summed negative log-likelihood over the summed target weight (tokens, or words of the
target bags), with the hidden state carried from one window to the next, as the systems' validation does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.fabric.utilities import move_data_to_device
from torch import nn

from lm_lightning.data.batch import Bags
from lm_lightning.errors import LMInputError


def bag_nll(logits: torch.Tensor, targets: Bags | torch.Tensor) -> torch.Tensor:
    """Summed count-weighted negative log-likelihood of the target bags under ``logits`` ``(streams, time, vocab)``.

    ``-sum_r sum_w c_rw log_softmax(logits_r)_w = sum_r (sum_w c_rw) logsumexp(logits_r) - sum_{nonzeros} c_rw logits_rw``:
    the right-hand form reads only the nonzero targets and builds no log-softmax of the whole batch in the forward pass.
    """
    logits = logits.reshape(-1, logits.size(-1))
    if isinstance(targets, torch.Tensor):  # dense reference path
        return -(targets.reshape(logits.shape).to(logits.dtype) * logits.log_softmax(-1)).sum()
    picked = logits[targets.segment_ids(), targets.indices]
    return (targets.totals().to(logits.dtype) * logits.logsumexp(-1)).sum() - (targets.counts.to(logits.dtype) * picked).sum()


def nll(logits: torch.Tensor, targets: torch.Tensor | Bags) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` (token ids, or ``Bags`` of the next segments) under ``logits``.

    Half-precision logits are upcast for a stable log-softmax; float64 (precision 64-true) is kept.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if isinstance(targets, Bags):
        return bag_nll(logits, targets)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


def network_device(network: nn.Module) -> torch.device:
    """Where the network's weights are: its parameters, or its buffers (a network without parameters)."""
    tensor = next(iter(network.parameters()), None)
    if tensor is None:
        tensor = next(iter(network.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def perplexity(
    network: nn.Module, batches: Iterable, max_batches: Optional[int] = None, device: Optional[torch.device | str] = None
) -> float:
    """Perplexity of ``network`` over consecutive windows (``Batch`` items, e.g. ``datamodule.test_dataloader()``)."""
    was_training = network.training
    network.eval()
    device = torch.device(device) if device is not None else network_device(network)
    hidden, total, weight = None, 0.0, 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        logits, hidden = network(move_data_to_device(batch.inputs, device), hidden)
        total += float(nll(logits, move_data_to_device(batch.targets, device)))
        weight += batch.divisor
    network.train(was_training)
    if weight == 0:
        raise LMInputError("perplexity needs at least one batch: the evaluation split is empty.")
    return math.exp(total / weight)
