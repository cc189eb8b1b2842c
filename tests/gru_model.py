"""A model that lives only in tests/: proof that a fork plugs in its own network by class path.

    python -m lm_lightning fit --model gru_model.GRULanguageModel   (with tests/ on PYTHONPATH)
"""

from __future__ import annotations

import torch
from torch import nn

from lm_lightning.systems import LanguageModel


class GRUNetwork(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int) -> None:
        super().__init__()
        # The constructor arguments: an export records them, so `generate` rebuilds this network from its class path.
        self.config = {"vocab_size": vocab_size, "embedding_dim": embedding_dim, "hidden_dim": hidden_dim, "num_layers": num_layers}
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.gru = nn.GRU(embedding_dim, hidden_dim, num_layers, batch_first=True)
        self.decoder = nn.Linear(hidden_dim, vocab_size)

    def forward(self, ids: torch.Tensor, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        output, hidden = self.gru(self.embedding(ids), hidden)
        return self.decoder(output), hidden


class GRULanguageModel(LanguageModel):
    """Same system (truncated BPTT, perplexity, sampling), a GRU network instead of the LSTM."""

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return GRUNetwork(hp.vocab_size, hp.embedding_dim, hp.hidden_dim, hp.num_layers)
