"""The token path's LightningModule: the training system around a token network (``networks/lstm.py`` by default).

Everything about training over stream windows comes from :class:`~lm_lightning.systems.base.StreamSystem`; this
class adds what is particular to tokens: its hyper-parameters, the network it builds, and text generation (a sample
logged at each validation, and ``predict``).

To train another network, subclass and override :meth:`build_network` (see ``tests/gru_model.py``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lm_lightning.chunked_loss import chunked_nll
from lm_lightning.data.batch import Batch
from lm_lightning.errors import LMInputError
from lm_lightning.generation import sample
from lm_lightning.networks import LSTMNetwork
from lm_lightning.systems.base import StreamSystem

# torch's optimizers that accept sparse gradients (the others raise at their first step).
SPARSE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adagrad, torch.optim.SparseAdam)


def check_takes_sparse_gradients(optimizer: torch.optim.Optimizer) -> None:
    """One sentence before training instead of an error at the first step (custom optimizers are trusted)."""
    name = type(optimizer).__name__
    if type(optimizer).__module__.startswith("torch.optim") and not isinstance(optimizer, SPARSE_OPTIMIZERS):
        raise LMInputError(
            f"--model.sparse_embedding_grad needs an optimizer that takes sparse gradients, and {name} does not: "
            "give --model.optimizer SGD (or Adagrad), or --model.sparse_embedding_grad false."
        )
    if isinstance(optimizer, torch.optim.SGD) and any(group["weight_decay"] for group in optimizer.param_groups):
        raise LMInputError(
            "--model.sparse_embedding_grad with SGD needs --model.optimizer.init_args.weight_decay 0: torch's SGD cannot "
            "decay a sparse gradient's weights."
        )


class LanguageModel(StreamSystem):
    """Embedding + LSTM language model trained with truncated backpropagation through time.

    Args:
        vocab_size: Set from the datamodule by the CLI; give it only when using the class on its own.
        embedding_dim: Width of the token embedding.
        hidden_dim: Width of each LSTM layer.
        num_layers: Stacked LSTM layers.
        dropout: Dropout on embeddings, between LSTM layers and before the decoder.
        tie_weights: Share the embedding and decoder matrices (Press & Wolf 2017); needs embedding_dim == hidden_dim.
        optimizer: Optimizer class and arguments, e.g. ``--model.optimizer SGD --model.optimizer.lr 1``.
        lr_scheduler: Optional schedule, stepped once per epoch (``ReduceLROnPlateau`` watches ``val/ppl``).
        sample_length: Tokens of text generated and logged at each validation (0 turns it off).
        max_new_tokens: Tokens generated per sample by ``predict``.
        temperature: Sampling temperature (0 = greedy).
        top_k: Sample only among the ``top_k`` most likely tokens; ``None`` for all.
        seed: Seed of the sampler, so generated text is reproducible.
        loss_chunk_size: Compute the loss this many tokens at a time, never holding the full logits (saves
            ~2 x tokens x vocab x 4 bytes; configs/memory/chunked_loss.yaml); 0 for the plain path.
        recompute_segments: Recompute the LSTM in the backward pass, in this many time segments per window, instead
            of keeping its activations (configs/memory/recompute.yaml); 0 keeps them.
        sparse_embedding_grad: Give the (untied) embedding a sparse gradient, only the rows a batch uses, instead of
            a vocab x embedding_dim matrix; needs an optimizer that takes sparse gradients (SGD without weight decay,
            Adagrad).
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 256,
        hidden_dim: int = 256,
        num_layers: int = 2,
        dropout: float = 0.2,
        tie_weights: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        sample_length: int = 40,
        max_new_tokens: int = 60,
        temperature: float = 0.8,
        top_k: Optional[int] = 50,
        seed: int = 0,
        loss_chunk_size: int = 0,
        recompute_segments: int = 0,
        sparse_embedding_grad: bool = False,
    ) -> None:
        super().__init__(optimizer, lr_scheduler)
        if not temperature >= 0:  # also refuses NaN
            raise LMInputError(f"--model.temperature must be >= 0, got {temperature}: give 0 for greedy decoding or e.g. 0.8.")
        if top_k is not None and top_k < 1:
            raise LMInputError(
                f"--model.top_k must be a positive integer, got {top_k}: give e.g. 50, or null to sample from all tokens."
            )
        for name, value in (("sample_length", sample_length), ("max_new_tokens", max_new_tokens)):
            if value < 0:
                raise LMInputError(f"--model.{name} must be >= 0, got {value}: give a number of tokens (0 turns it off).")
        if loss_chunk_size < 0:
            raise LMInputError(
                f"--model.loss_chunk_size must be >= 0, got {loss_chunk_size}: give a number of tokens such as 256, or 0 for the plain loss."
            )
        if recompute_segments < 0:
            raise LMInputError(
                f"--model.recompute_segments must be >= 0, got {recompute_segments}: give a number of segments such as 5, or 0 to keep the activations."
            )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.attach(self.build_network())
        if loss_chunk_size and not (
            callable(getattr(self.network, "features", None)) and isinstance(getattr(self.network, "decoder", None), nn.Linear)
        ):
            raise LMInputError(
                f"--model.loss_chunk_size needs a network with a features() method and an nn.Linear decoder (as networks/lstm.py has); "
                f"{type(self.network).__name__} lacks them: add them, or give --model.loss_chunk_size 0."
            )
        if recompute_segments:
            if not hasattr(self.network, "recompute_segments"):
                raise LMInputError(
                    f"--model.recompute_segments needs a network with a recompute_segments attribute (as networks/lstm.py has); "
                    f"{type(self.network).__name__} lacks it: add it, or give --model.recompute_segments 0."
                )
            self.network.recompute_segments = recompute_segments
        if sparse_embedding_grad:
            if tie_weights:
                raise LMInputError(
                    "--model.sparse_embedding_grad needs --model.tie_weights false: a tied decoder reads every row of the "
                    "embedding, so its gradient is dense."
                )
            if not isinstance(getattr(self.network, "embedding", None), nn.Embedding):
                raise LMInputError(
                    f"--model.sparse_embedding_grad needs a network with an nn.Embedding named embedding; "
                    f"{type(self.network).__name__} has none: add it, or give --model.sparse_embedding_grad false."
                )
            self.network.embedding.sparse = True

    def build_network(self) -> nn.Module:
        """Override to train another network with the same ``forward(ids, hidden) -> (logits, hidden)`` contract."""
        hp = self.hparams
        return LSTMNetwork(hp.vocab_size, hp.embedding_dim, hp.hidden_dim, hp.num_layers, hp.dropout, hp.tie_weights)

    # --- sparse embedding gradients ---------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        optimizer = config["optimizer"] if isinstance(config, dict) else config
        if self.hparams.sparse_embedding_grad:
            check_takes_sparse_gradients(optimizer)
        return config

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Optional[float] = None, gradient_clip_algorithm: Optional[str] = None
    ) -> None:
        # torch's clip_grad_norm_ has no sparse kernel (linalg_vector_norm on SparseCPU): the same rule, by hand.
        if not self.hparams.sparse_embedding_grad or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            for grad in grads:
                (grad._values() if grad.is_sparse else grad).clamp_(-gradient_clip_val, gradient_clip_val)
            return None
        norms = [(grad.coalesce().values() if grad.is_sparse else grad).float().norm() for grad in grads]
        total = torch.linalg.vector_norm(torch.stack(norms))
        scale = (gradient_clip_val / (total + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))
        return None

    def _nll(self, inputs: torch.Tensor, targets: torch.Tensor, hidden: Any) -> tuple[torch.Tensor, Any]:
        if not self.hparams.loss_chunk_size:
            return super()._nll(inputs, targets, hidden)
        features, hidden = self.network.features(inputs, hidden)
        return chunked_nll(features, self.network.decoder, targets, self.hparams.loss_chunk_size), hidden

    # --- generation -----------------------------------------------------------------------------------
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Continue ``prompt`` (1, T) by ``max_new_tokens`` sampled tokens; returns (1, T + max_new_tokens). The
        sampling settings (temperature, top_k, generator) are ``generation.sample``'s."""
        return sample(self.network, prompt, max_new_tokens, *args, **kwargs)

    def _sample_text(self, prompt: torch.Tensor, max_new_tokens: int, seed: int) -> str:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        hp = self.hparams
        ids = self.generate(prompt.to(self.device), max_new_tokens, hp.temperature, hp.top_k, generator)
        return self.trainer.datamodule.decode(ids[0].tolist())

    def _log_sample(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "decode"):
            return
        prompt = torch.tensor([[datamodule.vocab.eos_id]])
        self._log_text("samples/generated", self._sample_text(prompt, self.hparams.sample_length, self.hparams.seed))

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, str]:
        prompt = self.trainer.datamodule.decode(batch.inputs[0].tolist())
        text = self._sample_text(batch.inputs, self.hparams.max_new_tokens, self.hparams.seed + batch_idx)
        return {"prompt": prompt, "text": text}
