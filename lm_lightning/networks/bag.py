"""Segment-level bag-of-words language model: from the segments read so far, the words of the next segment.

    segment counts (CSR rows) -> EmbeddingBag (count-weighted sum) -> dropout -> LSTM over segments
                              -> dropout -> linear decoder -> one distribution over the words of the next segment

A segment (a sentence, a line or a window of W words) is a bag: which words, how often, in no order. The bag is
embedded as the count-weighted sum of its word vectors, the unordered composition of Iyyer et al. (2015), "Deep
Unordered Composition Rivals Syntactic Methods for Text Classification" (ACL), computed by ``nn.EmbeddingBag`` from
the nonzero counts only: no (segments x vocabulary) matrix is ever built. The LSTM reads one bag per step, as the
token model reads one word per step, and carries its state across truncated-BPTT windows the same way.

The next segment's words are scored as independent draws from the predicted distribution ``p`` (a multinomial, as
in the bag-of-words loss of Zhao et al. 2017, arXiv:1703.10960): its negative log-likelihood is
``-sum_w count_w * log p(w)``, and ``exp`` of that divided by the number of words is a per-word perplexity, directly
comparable with a unigram model's (which predicts the same ``p`` for every segment).

Sum or mean of the word vectors (``bag_weighting``): the count-weighted sum keeps a segment's length, which the mean
throws away (docs/bag_of_words.md gives the measured difference); the mean suits corpora whose segments differ wildly in length,
where sums of very different scales reach the LSTM.

This file knows nothing about Lightning. ``forward`` also takes dense ``(streams, time, vocab)`` count tensors, the
plain reference path that tests hold the sparse path equal to; it is not meant for training.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import torch
from torch import nn

from lm_lightning.data.batch import Bags
from lm_lightning.errors import LMInputError
from lm_lightning.networks.lstm import LSTMNetwork

Hidden = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, streams, hidden_dim)
BagWeighting = Literal["mean", "sum"]


Segments = Union[Bags, torch.Tensor]


class BagLSTMNetwork(LSTMNetwork):
    """Bags of segments -> logits over the words of the next segment (the ``nn.Module``; ``systems/bag.py`` trains it).

    The token network (``networks/lstm.py``) with an ``nn.EmbeddingBag`` input: its sizes, dropout and weight tying
    are ``LSTMNetwork``'s arguments, with its defaults (``configs/bag_embedded.yaml`` sets the bag recipe's).

    Args:
        vocab_size: Words in the vocabulary (``<unk>`` included).
        bag_weighting: ``sum`` (count-weighted sum of the word vectors) or ``mean`` (count-weighted mean).
        kwargs: ``LSTMNetwork``'s ``embedding_dim``, ``hidden_dim``, ``num_layers``, ``dropout`` and ``tie_weights``.
    """

    def __init__(self, vocab_size: int, bag_weighting: BagWeighting = "sum", **kwargs: Any) -> None:
        if bag_weighting not in ("mean", "sum"):
            raise LMInputError(f"bag_weighting must be 'mean' or 'sum', got {bag_weighting!r}.")
        super().__init__(vocab_size, **kwargs)
        self.config["bag_weighting"] = self.bag_weighting = bag_weighting  # an export rebuilds the network from config

    def make_embedding(self, vocab_size: int, embedding_dim: int) -> nn.Module:
        # mode="sum" because only "sum" takes per-sample weights (the counts); the mean is taken in embed().
        return nn.EmbeddingBag(vocab_size, embedding_dim, mode="sum", include_last_offset=True)

    def embed(self, segments: Segments) -> torch.Tensor:
        """Bag vectors ``(streams, time, embedding_dim)`` of sparse ``Bags`` or of dense ``(streams, time, vocab)`` counts."""
        if isinstance(segments, torch.Tensor):  # dense reference path: counts @ embedding matrix
            counts = segments.to(self.embedding.weight.dtype)
            bags = counts @ self.embedding.weight
            totals = counts.sum(-1, keepdim=True)
        else:
            counts = segments.counts.to(self.embedding.weight.dtype)
            bags = self.embedding(segments.indices, segments.offsets, per_sample_weights=counts)
            bags = bags.view(segments.streams, -1, bags.size(-1))
            totals = segments.totals().view(segments.streams, -1, 1)
        if self.bag_weighting == "mean":
            bags = bags / totals.clamp_min(1).to(bags.dtype)  # an empty bag stays a zero vector
        return bags
