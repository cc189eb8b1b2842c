"""Adaptive softmax: the output layer in clusters of words by frequency (a memory strategy; Grave et al. 2017).

At a real vocabulary the decoder is most of the network: at WikiText-2's 33,278 words the tied 33,278 x 200 matrix is
26.6 of a 2x200 LSTM's 29.3 MB, and per token the full softmax costs ten times the two LSTM layers. The adaptive
softmax (``networks/adaptive.py``) scores the frequent words in full and a rare word through its cluster's narrow
projection, and trains touching only the clusters its targets fall in: fewer parameters, gradients and optimizer state,
no ``tokens x vocabulary`` logits, and several times the speed. It is a different model from the full softmax, not an
approximation of it: its distribution is normalized over every word, and the loss here (training, validation, test) is
exactly -log p(target) under it (tests/test_adaptive.py holds it to the full distribution).

It replaces the network's ``decoder`` (the contract's output-layer hook: ``features`` and an ``nn.Linear`` decoder) and
computes the loss from the features, as the chunked loss does, which it makes unnecessary: the two refuse each other.
On a tied network, the adaptive input (``configs/memory/adaptive.yaml``) shares its word matrices; without it the
embedding keeps its full matrix, untied (the run says so).
"""

from __future__ import annotations

import torch
from torch import nn

from lm_lightning.callbacks.adaptive import AdaptiveLayerStrategy
from lm_lightning.errors import LMInputError
from lm_lightning.networks.adaptive import AdaptiveLogSoftmax
from lm_lightning.networks.contract import output_layer


class AdaptiveNLL:
    """The system's ``loss_head``: the summed -log p(targets) cluster by cluster (``AdaptiveLogSoftmax.nll``)."""

    def __call__(self, network: nn.Module, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return network.decoder.nll(features, targets)


class AdaptiveSoftmax(AdaptiveLayerStrategy):
    """Replace the full softmax by an adaptive softmax over word clusters (frequent words in full, rare words through
    narrower projections), trained and evaluated with its exact loss.

    Args:
        cutoffs: Word ids where clusters start, in a vocabulary sorted by frequency: ``[2000, 10000]`` makes the 2,000
            most frequent words the head, the next 8,000 the first tail cluster, the rest the second. Default: 6% and
            30% of the vocabulary, rounded to two figures (``[2000, 10000]`` at WikiText-2's 33,278 words).
        div_value: Each tail cluster gets ``hidden_dim / div_value**i`` dimensions.
    """

    name = "adaptive_softmax"
    replaces = "decoder"
    partner = "embedding"
    title = "adaptive softmax"
    layer = AdaptiveLogSoftmax

    def vocab_size_of(self, network: nn.Module) -> int:
        return output_layer(network, type(self).__name__).out_features

    def build(self, network: nn.Module, vocab_size: int, cutoffs: list[int], div_value: float) -> nn.Module:
        return AdaptiveLogSoftmax(vocab_size, network.decoder.in_features, cutoffs, div_value)

    def apply(self, system: nn.Module) -> None:
        self.restructure(system)
        if system.loss_head is not None and not isinstance(system.loss_head, AdaptiveNLL):
            raise LMInputError(
                f"AdaptiveSoftmax computes the loss cluster by cluster, and another memory strategy of this run already "
                f"computes it its own way ({type(system.loss_head).__name__}; the adaptive softmax never builds the full "
                "logits either): leave one of the two out."
            )
        system.loss_head = AdaptiveNLL()
