"""Sparse embedding gradients: the embedding's gradient holds only the rows a batch used (a memory strategy).

An ``nn.Embedding``'s dense gradient is a ``vocab x embedding_dim`` matrix, mostly zeros: one window touches a few
hundred of tens of thousands of rows. With ``sparse=True`` torch gives a sparse gradient of those rows only, and an
optimizer that takes sparse gradients (SGD without weight decay, Adagrad, SparseAdam) updates only them. Gradient
clipping handles sparse gradients in the system (``StreamSystem.configure_gradient_clipping``).

A tied decoder reads every row of the matrix, so its gradient is dense whatever the embedding says: refused. Works on
every ``nn.Embedding`` of any network (found in its modules; the contract asks nothing more of it).

DDP all-reduces the sparse gradients with gloo (CPU processes); NCCL, the GPUs' backend, has no sparse all-reduce, so a
DDP run on GPUs with this strategy is refused before it starts (``storage/preflight.py: check_sparse_all_reduce``,
which asks ``makes_sparse_gradients``).
"""

from __future__ import annotations

from typing import ClassVar

import lightning as L
import torch
from torch import nn

from lm_lightning.callbacks.strategy import MemoryStrategy
from lm_lightning.errors import LMInputError

# torch's optimizers that accept sparse gradients (the others raise at their first step).
SPARSE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adagrad, torch.optim.SparseAdam)


def sparse_embeddings(network: nn.Module) -> list[nn.Embedding]:
    """The network's ``nn.Embedding``s, or one sentence when there is none or one shares its matrix with another layer."""
    embeddings = [m for m in network.modules() if type(m) is nn.Embedding]
    if not embeddings:
        raise LMInputError(
            f"SparseEmbeddingGradients needs an nn.Embedding in the network; {type(network).__name__} has none: leave it out."
        )
    shared = {id(p) for m in network.modules() if not isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    if any(id(e.weight) in shared for e in embeddings):
        raise LMInputError(
            "SparseEmbeddingGradients needs untied weights (--model.network.init_args.tie_weights false): a tied decoder "
            "reads every row of the embedding, so its gradient is dense."
        )
    return embeddings


def check_takes_sparse_gradients(optimizer: torch.optim.Optimizer) -> None:
    """One sentence before training instead of an error at the first step (custom optimizers are trusted)."""
    name = type(optimizer).__name__
    if type(optimizer).__module__.startswith("torch.optim") and not isinstance(optimizer, SPARSE_OPTIMIZERS):
        raise LMInputError(
            f"SparseEmbeddingGradients needs an optimizer that takes sparse gradients, and {name} does not: "
            "give --model.optimizer SGD (or Adagrad), or leave the strategy out."
        )
    if isinstance(optimizer, torch.optim.SGD) and any(group["weight_decay"] for group in optimizer.param_groups):
        raise LMInputError(
            "SparseEmbeddingGradients with SGD needs --model.optimizer.init_args.weight_decay 0: torch's SGD cannot "
            "decay a sparse gradient's weights."
        )


class SparseEmbeddingGradients(MemoryStrategy):
    """Give the (untied) embeddings a sparse gradient, only the rows a batch uses, instead of a vocab x embedding_dim
    matrix; needs an optimizer that takes sparse gradients (SGD without weight decay, Adagrad)."""

    name = "sparse_gradients"
    makes_sparse_gradients: ClassVar[bool] = True  # read before a run starts: NCCL cannot all-reduce them

    def label(self) -> str:
        return "sparse embedding grads"

    def apply(self, system: nn.Module) -> None:
        for embedding in sparse_embeddings(system.network):
            embedding.sparse = True

    def probe(self, system: L.LightningModule) -> None:
        self.apply(system)
        config = system.configure_optimizers()  # estimate steps this copy's own optimizer: refuse as fit would
        check_takes_sparse_gradients(config["optimizer"] if isinstance(config, dict) else config)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:  # built by now, before the first step
            check_takes_sparse_gradients(optimizer)
