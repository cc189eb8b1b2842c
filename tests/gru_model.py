"""A network that lives only in tests/: proof that a fork is one file and no subclass.

    python -m lm_lightning fit --model.network gru_model.GRUNetwork --model.network.init_args.hidden_dim 64
    (with tests/ on PYTHONPATH)

It keeps the whole network contract of lm_lightning/networks/contract.py: ``forward(ids, hidden) -> (logits, hidden)``,
the output-layer hook (``features`` and an ``nn.Linear`` ``decoder``) and ``config``.
"""

from __future__ import annotations

import torch
from torch import nn


class GRUNetwork(nn.Module):
    """Token ids -> embedding -> GRU -> linear decoder.

    Args:
        vocab_size: Tokens in the vocabulary (set from the data by the CLI).
        embedding_dim: Width of the token embedding.
        hidden_dim: Width of each GRU layer.
        num_layers: Stacked GRU layers.
    """

    def __init__(self, vocab_size: int, embedding_dim: int = 64, hidden_dim: int = 64, num_layers: int = 1) -> None:
        super().__init__()
        self.config = {"vocab_size": vocab_size, "embedding_dim": embedding_dim, "hidden_dim": hidden_dim, "num_layers": num_layers}
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.gru = nn.GRU(embedding_dim, hidden_dim, num_layers, batch_first=True)
        self.decoder = nn.Linear(hidden_dim, vocab_size)

    def features(self, ids: torch.Tensor, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gru(self.embedding(ids), hidden)

    def forward(self, ids: torch.Tensor, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        output, hidden = self.features(ids, hidden)
        return self.decoder(output), hidden


class BareGRUNetwork(nn.Module):
    """Only the required part of the contract: no output-layer hook, so the chunked loss must refuse it."""

    def __init__(self, vocab_size: int, hidden_dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_dim)
        self.gru = nn.GRU(hidden_dim, hidden_dim, batch_first=True)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, ids: torch.Tensor, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        output, hidden = self.gru(self.embedding(ids), hidden)
        return self.head(output), hidden
