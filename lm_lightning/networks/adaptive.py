"""Adaptive input and adaptive softmax: the vocabulary in clusters by frequency, rare words given fewer dimensions.

* Adaptive softmax (Grave et al. 2017, "Efficient softmax approximation for GPUs", arXiv:1609.04309), as torch's
  ``nn.AdaptiveLogSoftmaxWithLoss``: a head scores the most frequent words and one entry per tail cluster; a word of
  tail cluster ``i`` has probability p(cluster i) x p(word | cluster i), the latter from a projection of the features
  to ``dim // div_value**i`` dimensions. It defines a normalized distribution over the whole vocabulary, so the loss
  computed cluster by cluster (:meth:`AdaptiveLogSoftmax.nll`) is exactly -log p(target): training touches only the
  clusters its targets fall in, evaluation is not an approximation.
* Adaptive input (Baevski & Auli 2019, "Adaptive Input Representations for Neural Language Modeling",
  arXiv:1809.10853): the same clusters on the input side, cluster ``i``'s words embedded in ``dim // div_value**i``
  dimensions and projected up to ``dim``.
* Tied (their "ADP-T" without the shared projections): cluster ``i``'s word matrix is one parameter for both, as the
  full softmax's decoder shares the embedding (Press & Wolf 2017). The projections stay apart (``dim x width`` each,
  small); torch has no adaptive input, and its adaptive softmax keeps the head's word and cluster rows in one matrix,
  so neither can be tied: this file is those two layers written to share their matrices.

Why not torch's module: besides the tie, its ``forward`` skips a cluster no target falls in, and DDP then waits for
gradients that never come; here every cluster takes part in every step (an empty one with zero rows).

The cutoffs index a vocabulary sorted by frequency (``data/vocabulary.py`` builds it so); cluster ``0``, the head, is
ids ``[0, cutoffs[0])``. A strategy installs these layers in place of a network's ``embedding`` and ``decoder``
(``callbacks/adaptive_input.py``, ``callbacks/adaptive_softmax.py``) through :func:`install`, which also ties them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lm_lightning.errors import LMInputError
from lm_lightning.networks.contract import replace_module

# Default cluster edges as fractions of the vocabulary: the head holds the most frequent 6%, the first tail up to 30%,
# the second the rest. On WikiText-2's 33,278 words that is [2000, 10000]: 77% of the training tokens fall in the head
# and 93% in the head or the first tail, so most steps touch the narrow tails for few tokens; see default_cutoffs.
HEAD_SHARE, FIRST_TAIL_SHARE = 0.06, 0.30
DEFAULT_DIV_VALUE = 4.0  # both papers' factor between clusters' widths


def _two_figures(x: float) -> int:
    """``x`` rounded to two significant figures (1997 -> 2000, 9983 -> 10000, 612 -> 610)."""
    if x < 10:
        return int(round(x))
    scale = 10 ** (int(math.log10(x)) - 1)
    return int(round(x / scale) * scale)


def default_cutoffs(vocab_size: int) -> list[int]:
    """Cluster edges from the vocabulary's size: 6% and 30% of it, rounded to two figures (``HEAD_SHARE``). A
    vocabulary too small for two tails gets one, at half its size."""
    edges = sorted({_two_figures(vocab_size * share) for share in (HEAD_SHARE, FIRST_TAIL_SHARE)})
    edges = [e for e in edges if 2 <= e <= vocab_size - 2]
    return edges if len(edges) == 2 else [max(1, vocab_size // 2)]


def check_cutoffs(cutoffs: list[int], vocab_size: Optional[int], flag: str) -> list[int]:
    """``cutoffs`` as a list of increasing ids inside the vocabulary (of any size while it is unknown), or one sentence
    naming the flag and the fix."""
    top = vocab_size if vocab_size is not None else math.inf
    if not (
        isinstance(cutoffs, (list, tuple)) and cutoffs and all(type(c) is int for c in cutoffs)
        and all(a < b for a, b in zip([0, *cutoffs], [*cutoffs, top]))
    ):  # fmt: skip
        shown = list(cutoffs) if isinstance(cutoffs, (list, tuple)) else cutoffs
        where = f"a {vocab_size}-word vocabulary: give increasing word counts between 1 and {vocab_size - 1}, e.g. {default_cutoffs(vocab_size)}" if vocab_size else "a vocabulary: give increasing positive word counts, e.g. [2000, 10000]"
        raise LMInputError(f"{flag} {shown!r} does not cut {where} (or leave it out for the default).")
    return list(cutoffs)


def check_layer(vocab_size: int, dim: int, cutoffs: list[int], div_value: float) -> None:
    """An adaptive layer's arguments (also an export's, untrusted), or one sentence naming the bad one."""
    if type(vocab_size) is not int or type(dim) is not int or dim < 1:
        raise LMInputError(f"An adaptive layer needs integer vocab_size and dim, got {vocab_size!r} and {dim!r}.")
    check_cutoffs(cutoffs, vocab_size, "cutoffs")
    if type(div_value) not in (int, float) or not 1 <= div_value < math.inf:
        raise LMInputError(f"An adaptive layer's div_value must be a number of at least 1, got {div_value!r}: give e.g. 4.")


def cluster_spans(cutoffs: list[int], vocab_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the head and each tail cluster."""
    edges = [0, *cutoffs, vocab_size]
    return list(zip(edges[:-1], edges[1:]))


def cluster_widths(dim: int, clusters: int, div_value: float) -> list[int]:
    """Cluster ``i`` gets ``dim // div_value**i`` dimensions, at least 1."""
    return [max(1, int(dim // div_value**i)) for i in range(clusters)]


class _AdaptiveLayer(nn.Module):
    """What both layers share: how an export's rebuild puts one back in a network (``export/rebuild.py``)."""

    def attach(self, network: nn.Module, name: str) -> None:
        """Put this layer in ``network`` in place of ``name``, tied as it was trained."""
        install(network, name, self)


class AdaptiveEmbedding(_AdaptiveLayer):
    """Token ids -> ``(..., dim)`` vectors, cluster ``i`` embedded in ``dim // div_value**i`` and projected to ``dim``.

    Every cluster is looked up for every token and masked (ids outside a cluster read its row 0 and get weight 0): a
    few small matrix products, and one graph with no data-dependent shapes, which is what the ONNX export traces.
    """

    def __init__(self, vocab_size: int, dim: int, cutoffs: list[int], div_value: float = DEFAULT_DIV_VALUE) -> None:
        super().__init__()
        check_layer(vocab_size, dim, cutoffs, div_value)
        self.config = {"vocab_size": vocab_size, "dim": dim, "cutoffs": list(cutoffs), "div_value": div_value}
        self.spans = cluster_spans(cutoffs, vocab_size)
        widths = cluster_widths(dim, len(self.spans), div_value)
        self.embeddings = nn.ModuleList(nn.Embedding(stop - start, w) for (start, stop), w in zip(self.spans, widths))
        self.projections = nn.ModuleList(nn.Identity() if w == dim else nn.Linear(w, dim, bias=False) for w in widths)
        for embedding in self.embeddings:
            nn.init.uniform_(embedding.weight, -0.1, 0.1)  # the full embedding's init (networks/lstm.py)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = None
        for (start, stop), embedding, projection in zip(self.spans, self.embeddings, self.projections):
            inside = (ids >= start) & (ids < stop)
            vectors = projection(embedding((ids - start).clamp(0, stop - start - 1)))
            vectors = vectors * inside.unsqueeze(-1).to(vectors.dtype)
            out = vectors if out is None else out + vectors
        return out


class AdaptiveLogSoftmax(_AdaptiveLayer):
    """Features ``(..., dim)`` -> log-probabilities over the vocabulary (``forward``, normalized: what generation,
    export and ``score`` read), or the summed -log p(targets) touching only the clusters they fall in (``nll``)."""

    def __init__(self, vocab_size: int, dim: int, cutoffs: list[int], div_value: float = DEFAULT_DIV_VALUE) -> None:
        super().__init__()
        check_layer(vocab_size, dim, cutoffs, div_value)
        self.config = {"vocab_size": vocab_size, "dim": dim, "cutoffs": list(cutoffs), "div_value": div_value}
        self.spans = cluster_spans(cutoffs, vocab_size)
        widths = cluster_widths(dim, len(self.spans), div_value)
        self.shortlist = nn.Linear(dim, cutoffs[0])  # the head's words (tied: the head cluster's input embedding)
        self.cluster_logits = nn.Linear(dim, len(cutoffs))  # the head's entry for each tail cluster
        self.tails = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, w, bias=False), nn.Linear(w, stop - start, bias=False))
            for (start, stop), w in zip(self.spans[1:], widths[1:])
        )
        nn.init.zeros_(self.shortlist.bias)  # the full decoder's init (networks/lstm.py)
        nn.init.uniform_(self.shortlist.weight, -0.1, 0.1)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(torch.cat([self.shortlist(x), self.cluster_logits(x)], -1), dim=-1, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self._head(x)
        short = self.spans[0][1]
        parts = [head[..., :short]]
        for i, tail in enumerate(self.tails):
            parts.append(F.log_softmax(tail(x), dim=-1, dtype=torch.float32) + head[..., short + i : short + i + 1])
        return torch.cat(parts, -1)

    def nll(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed -log p(targets) under :meth:`forward`'s distribution, exactly, without the full log-probabilities."""
        x, y = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        edges = torch.tensor(self.config["cutoffs"], device=y.device)
        cluster = torch.bucketize(y, edges, right=True)  # 0 for the head, i for tail cluster i
        short = self.spans[0][1]
        head_index = torch.where(cluster == 0, y, short + cluster - 1)
        total = -self._head(x).gather(1, head_index.unsqueeze(1)).sum()
        for i, tail in enumerate(self.tails):
            rows = (cluster == i + 1).nonzero().squeeze(1)  # may be empty: the tail still takes part (DDP)
            local = y.index_select(0, rows) - self.spans[i + 1][0]
            scores = F.log_softmax(tail(x.index_select(0, rows)), dim=-1, dtype=torch.float32)
            total = total - scores.gather(1, local.unsqueeze(1)).sum()
        return total


def tied_matrices(embedding: AdaptiveEmbedding, softmax: AdaptiveLogSoftmax) -> list[tuple[nn.Module, nn.Module]]:
    """The (output layer, input embedding) pairs that share a matrix: the head's words and each tail's words."""
    return [(softmax.shortlist, embedding.embeddings[0])] + [
        (tail[1], embedding.embeddings[i + 1]) for i, tail in enumerate(softmax.tails)
    ]


def install(network: nn.Module, name: str, module: nn.Module, tied: Optional[bool] = None) -> None:
    """Put an adaptive layer in place of ``network.embedding`` or ``network.decoder`` (recorded, so an export rebuilds
    it), and share the word matrices once both sides are adaptive and the network was tied.

    ``tied`` defaults to what the network does now: its plain embedding and decoder share a matrix, or the adaptive
    side already installed was tied. The installed layer remembers it (``module.tied``) for the other side.
    """
    if tied is None:
        other = getattr(network, "decoder" if name == "embedding" else "embedding")
        tied = getattr(other, "tied", None)
        if tied is None:
            tied = network.decoder.weight is network.embedding.weight
    module.tied = tied
    replace_module(network, name, module)
    embedding, softmax = network.embedding, network.decoder
    if tied and isinstance(embedding, AdaptiveEmbedding) and isinstance(softmax, AdaptiveLogSoftmax):
        if embedding.config != softmax.config:
            raise LMInputError(
                f"The adaptive input ({embedding.config}) and the adaptive softmax ({softmax.config}) of a tied network "
                "must cut the vocabulary alike: give both the same cutoffs and div_value."
            )
        for output, word_embedding in tied_matrices(embedding, softmax):
            output.weight = word_embedding.weight
