"""Embedding + LSTM language model, the classic recipe of Zaremba et al. (2014), "Recurrent Neural Network
Regularization" (arXiv:1409.2329), as in pytorch/examples ``word_language_model``:

    token ids -> embedding -> dropout -> multi-layer LSTM -> dropout -> linear decoder -> logits

With ``tie_weights`` the decoder reuses the embedding matrix (Press & Wolf 2017, "Using the Output Embedding to
Improve Language Models", arXiv:1608.05859; Inan et al. 2017): it removes ``vocab_size x hidden_dim``
parameters, often the largest single matrix, and usually lowers perplexity.

This file knows nothing about Lightning; it keeps the network contract of ``networks/contract.py``, with the
optional output-layer hook (``features`` and ``decoder``) that the chunked loss uses.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lm_lightning.errors import LMInputError

Hidden = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, batch, hidden_dim)


def init_weights(embedding: nn.Module, lstm: nn.LSTM, decoder: nn.Linear) -> None:
    """Small uniform init for the embedding/decoder as in word_language_model; a large init on a tied matrix
    makes the first logits huge. The LSTM keeps PyTorch's U(-1/sqrt(h), 1/sqrt(h)) init, except the forget-gate
    bias, set to 1 so early gradients flow through time (Jozefowicz et al. 2015)."""
    nn.init.uniform_(embedding.weight, -0.1, 0.1)
    nn.init.zeros_(decoder.bias)
    if decoder.weight is not embedding.weight:
        nn.init.uniform_(decoder.weight, -0.1, 0.1)
    h = lstm.hidden_size
    for name, param in lstm.named_parameters():
        if name.startswith("bias_ih"):
            with torch.no_grad():
                param[h : 2 * h].fill_(1.0)  # gate order: input, forget, cell, output


def check_network_args(
    vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int, dropout: float, tie_weights: bool
) -> None:
    """The settings every embedding + LSTM network shares, checked once with a sentence that names the fix."""
    if vocab_size < 2:
        raise LMInputError(
            f"vocab_size must be at least 2, got {vocab_size}: the corpus produced an (almost) empty vocabulary; "
            "check --data.source and lower --data.min_freq."
        )
    for name, value in (("embedding_dim", embedding_dim), ("hidden_dim", hidden_dim), ("num_layers", num_layers)):
        if value < 1:
            raise LMInputError(f"--model.network.{name} must be a positive integer, got {value}: give 1 or more (the default is a good start).")
    if tie_weights and embedding_dim != hidden_dim:
        raise LMInputError(
            f"tie_weights needs embedding_dim == hidden_dim (got {embedding_dim} and {hidden_dim}): "
            "make them equal or pass --model.network.tie_weights false."
        )
    if not 0 <= dropout < 1:  # also refuses NaN
        raise LMInputError(f"--model.network.dropout must be in [0, 1), got {dropout}: give a rate such as 0.2 (0 turns dropout off).")


class LSTMNetwork(nn.Module):
    """Token ids -> logits over the next token (the ``nn.Module``; ``systems/tokens.py`` trains it).

    Args:
        vocab_size: Tokens in the vocabulary.
        embedding_dim: Width of the token embedding.
        hidden_dim: Width of each LSTM layer.
        num_layers: Stacked LSTM layers.
        dropout: Dropout on embeddings, between LSTM layers and before the decoder.
        tie_weights: Share the embedding and decoder matrices; needs embedding_dim == hidden_dim.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 256,
        hidden_dim: int = 256,
        num_layers: int = 2,
        dropout: float = 0.2,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        # The arguments, which an export needs to rebuild this network (first line: locals() holds only them yet).
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__", "dropout")}
        check_network_args(vocab_size, embedding_dim, hidden_dim, num_layers, dropout, tie_weights)
        self.vocab_size, self.hidden_dim, self.num_layers = vocab_size, hidden_dim, num_layers
        self.embedding = self.make_embedding(vocab_size, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        # Dropout between LSTM layers only (not on the recurrent connections), as in Zaremba et al.
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers, dropout=dropout if num_layers > 1 else 0.0, batch_first=True)
        self.decoder = nn.Linear(hidden_dim, vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self.embedding, self.lstm, self.decoder)

    def make_embedding(self, vocab_size: int, embedding_dim: int) -> nn.Module:
        """The input layer; a network that reads another kind of input overrides it and :meth:`embed`
        (``networks/bag.py``: bags of words)."""
        return nn.Embedding(vocab_size, embedding_dim)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(batch, time)`` ids -> ``(batch, time, embedding_dim)`` vectors."""
        return self.embedding(ids)

    def features(self, ids: torch.Tensor, hidden: Optional[Hidden] = None) -> tuple[torch.Tensor, Hidden]:
        """What the decoder reads, (batch, time, hidden_dim), and the new hidden state: the chunked loss
        (``callbacks/chunked_loss.py``) starts here instead of from the logits."""
        output, hidden = self.lstm(self.dropout(self.embed(ids)), hidden)
        return self.dropout(output), hidden

    def forward(self, ids: torch.Tensor, hidden: Optional[Hidden] = None) -> tuple[torch.Tensor, Hidden]:
        """``ids``: (batch, time) -> logits (batch, time, vocab) and the new hidden state."""
        output, hidden = self.features(ids, hidden)
        return self.decoder(output), hidden
