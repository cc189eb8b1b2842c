"""The LightningModule: the training *system* around a language model network.

It owns what Lightning 2 leaves to the user for recurrent language models: carrying the hidden state from one
window to the next and detaching it (truncated BPTT; Lightning 2 removed ``truncated_bptt_steps``), one state per
stream group when a window arrives as micro-batches (``callbacks/accumulation.py``), resetting it at epoch
boundaries, token-weighted perplexity, sampling text, and building the optimizer and LR schedule that
LightningCLI injects. The network itself lives in ``lm_lightning/models`` and knows nothing of Lightning.

To train another network, subclass and override :meth:`build_network` (see ``tests/gru_model.py``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MeanMetric

from lm_lightning.errors import LMInputError
from lm_lightning.models import LSTMLanguageModel


def detach_hidden(hidden: Any) -> Any:
    """Cut the graph between windows (truncated BPTT) without touching the values."""
    if hidden is None:
        return None
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return type(hidden)(detach_hidden(h) for h in hidden)


class LanguageModel(L.LightningModule):
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
    ) -> None:
        super().__init__()
        if temperature < 0:
            raise LMInputError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
        if top_k is not None and top_k < 1:
            raise LMInputError(f"top_k must be a positive integer or unset, got {top_k}.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.network = self.build_network()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._hidden: dict[str, Any] = {}
        self._micro_losses: list[torch.Tensor] = []
        self._best_val_ppl = math.inf

    def build_network(self) -> nn.Module:
        """Override to train another network with the same ``forward(ids, hidden) -> (logits, hidden)`` contract."""
        hp = self.hparams
        return LSTMLanguageModel(hp.vocab_size, hp.embedding_dim, hp.hidden_dim, hp.num_layers, hp.dropout, hp.tie_weights)

    def forward(self, ids: torch.Tensor, hidden: Any = None) -> tuple[torch.Tensor, Any]:
        return self.network(ids, hidden)

    def on_fit_start(self) -> None:
        # TensorBoard's HPARAMS tab needs a metric to show runs side by side; Lightning's placeholder
        # "hp_metric" (-1) is turned off in favour of a real one, updated at every validation.
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.hparams, {"hp/best_val_ppl": math.nan})

    # --- training / evaluation ------------------------------------------------------------------------
    def _loss(self, batch: tuple, stage: str) -> torch.Tensor:
        inputs, targets, *group = batch
        # A micro-batch (callbacks/accumulation.py) is the group of streams starting at stream ``group[0]``; each
        # group carries its own hidden state, kept under its own key so any hidden-state layout works.
        key = f"{stage}/{group[0]}" if group else stage
        logits, hidden = self(inputs, self._hidden.get(key))
        self._hidden[key] = detach_hidden(hidden)
        # Half-precision logits are upcast for a stable log-softmax; float64 (precision 64-true) is kept.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def _reset_hidden(self, stage: str) -> None:
        for key in [key for key in self._hidden if key.split("/")[0] == stage]:
            del self._hidden[key]

    def on_train_epoch_start(self) -> None:
        self._reset_hidden("train")  # each epoch re-reads the streams from their start

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, "train")
        window_loss = self._window_loss(loss.detach(), batch)
        self.log("train/loss", window_loss, prog_bar=True)
        self.log("train/ppl", window_loss.exp())
        return loss

    def _window_loss(self, loss: torch.Tensor, batch: tuple) -> torch.Tensor:
        """Mean loss over the micro-batches of the current window so far (``loss`` itself for whole windows).

        Lightning writes step metrics at the optimizer step, i.e. after a window's last micro-batch, so
        ``train/loss`` is the per-token mean of the whole effective batch: every group has as many tokens.
        """
        if len(batch) < 3:
            return loss
        if batch[2] == 0:
            self._micro_losses = []
        self._micro_losses.append(loss)
        return torch.stack(self._micro_losses).mean()

    def on_validation_epoch_start(self) -> None:
        self._reset_hidden("val")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # Weighted by target count: the last window can be shorter, and perplexity is per token.
        self.val_loss.update(self._loss(batch, "val"), batch[1].numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True)
        self._after_validation(loss)

    def _after_validation(self, loss: torch.Tensor) -> None:
        """Best-so-far perplexity for TensorBoard's HPARAMS tab, and a text sample (not during the sanity check)."""
        if self.trainer.sanity_checking:
            return
        if self.trainer.state.fn == "fit":  # a stand-alone validate must not move the best-so-far
            self._best_val_ppl = min(self._best_val_ppl, float(loss.exp()))
            self.log("hp/best_val_ppl", self._best_val_ppl)
        if self.hparams.sample_length:
            self._log_sample()

    def on_test_epoch_start(self) -> None:
        self._reset_hidden("test")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.test_loss.update(self._loss(batch, "test"), batch[1].numel())

    def on_test_epoch_end(self) -> None:
        loss = self.test_loss.compute()
        self.test_loss.reset()
        self.log_dict({"test/loss": loss, "test/ppl": loss.exp()})

    # --- generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Continue ``prompt`` (1, T) by ``max_new_tokens`` sampled tokens; returns (1, T + max_new_tokens)."""
        was_training = self.training
        self.eval()
        logits, hidden = self(prompt)
        tokens = [prompt]
        for _ in range(max_new_tokens):
            next_logits = logits[:, -1].float()
            if temperature == 0:
                token = next_logits.argmax(-1, keepdim=True)
            else:
                next_logits = next_logits / temperature
                if top_k is not None and top_k < next_logits.size(-1):
                    kth = torch.topk(next_logits, top_k).values[:, -1:]
                    next_logits = next_logits.masked_fill(next_logits < kth, -math.inf)
                token = torch.multinomial(next_logits.softmax(-1), 1, generator=generator)
            tokens.append(token)
            logits, hidden = self(token, hidden)
        self.train(was_training)
        return torch.cat(tokens, dim=1)

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
        text = self._sample_text(prompt, self.hparams.sample_length, self.hparams.seed)
        for logger in self.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text("samples/generated", text, self.global_step)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, str]:
        prompt = self.trainer.datamodule.decode(batch[0].tolist())
        text = self._sample_text(batch, self.hparams.max_new_tokens, self.hparams.seed + batch_idx)
        return {"prompt": prompt, "text": text}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_val_ppl"] = self._best_val_ppl  # so a resumed run keeps its best-so-far

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._best_val_ppl = checkpoint.get("best_val_ppl", math.inf)

    # --- optimization ---------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/ppl"
        return {"optimizer": optimizer, "lr_scheduler": config}
