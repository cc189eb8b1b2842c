"""A memory strategy that lives only in tests/: proof that a new strategy is one file and touches nothing in the package.

    python -m lm_lightning fit --trainer.callbacks+=frozen_embedding.FrozenEmbedding   (with tests/ on PYTHONPATH)

Freezing the embedding (a pretrained or random projection kept fixed) drops its gradient and its optimizer state: a
vocabulary x width matrix each, the largest at a real vocabulary.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from lm_lightning.callbacks import MemoryStrategy


class FrozenEmbedding(MemoryStrategy):
    """Keep the network's nn.Embedding weights fixed: no gradient, no optimizer state for them.

    Args:
        modules: Names of the embeddings to freeze; all of the network's nn.Embedding modules when not given.
    """

    name = "frozen_embedding"

    def __init__(self, modules: Optional[list[str]] = None) -> None:
        self.modules = modules
        self.frozen: list[str] = []

    def label(self) -> str:
        return "frozen embedding"

    def hparams(self) -> dict[str, Any]:
        return {"modules": ", ".join(self.modules) if self.modules else "all"}

    def export_metadata(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def apply(self, system: nn.Module) -> None:
        embeddings = [name for name, module in system.network.named_modules() if isinstance(module, nn.Embedding)]
        self.frozen = [name for name in embeddings if self.modules is None or name in self.modules]
        for name in self.frozen:
            system.network.get_submodule(name).weight.requires_grad_(False)
