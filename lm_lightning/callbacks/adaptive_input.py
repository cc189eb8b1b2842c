"""Adaptive input: the embedding in clusters of words by frequency (a memory strategy; Baevski & Auli 2019).

The input side of the adaptive softmax's clusters (``networks/adaptive.py``): frequent words keep the full embedding
width, rare words get ``embedding_dim / div_value**i`` dimensions and a projection back up. Fewer parameters, gradients
and optimizer state at a large vocabulary; Baevski & Auli report it also trains faster and to a better perplexity on
WikiText-103, tied with the adaptive softmax (``configs/memory/adaptive.yaml``). Alone on a tied network, the full
decoder keeps the matrix the two shared, untied (the run says so).
"""

from __future__ import annotations

from torch import nn

from lm_lightning.callbacks.adaptive import AdaptiveLayerStrategy
from lm_lightning.errors import LMInputError
from lm_lightning.networks.adaptive import AdaptiveEmbedding


class AdaptiveInput(AdaptiveLayerStrategy):
    """Replace the token embedding by an adaptive one over word clusters (frequent words in full width, rare words
    narrower and projected up); tied with the adaptive softmax when both are on and the network ties its weights.

    Args:
        cutoffs: Word ids where clusters start, in a vocabulary sorted by frequency (see ``AdaptiveSoftmax``; a tied
            pair needs the same). Default: 6% and 30% of the vocabulary, rounded to two figures.
        div_value: Each tail cluster gets ``embedding_dim / div_value**i`` dimensions.
    """

    name = "adaptive_input"
    replaces = "embedding"
    partner = "decoder"
    title = "adaptive input"
    layer = AdaptiveEmbedding

    def vocab_size_of(self, network: nn.Module) -> int:
        embedding = getattr(network, "embedding", None)
        if not isinstance(embedding, nn.Embedding):
            raise LMInputError(
                f"AdaptiveInput needs a network whose `embedding` is an nn.Embedding (lm_lightning/networks/contract.py); "
                f"{type(network).__name__}'s is {type(embedding).__name__}: leave AdaptiveInput out."
            )
        return embedding.num_embeddings

    def build(self, network: nn.Module, vocab_size: int, cutoffs: list[int], div_value: float) -> nn.Module:
        return AdaptiveEmbedding(vocab_size, network.embedding.embedding_dim, cutoffs, div_value)
