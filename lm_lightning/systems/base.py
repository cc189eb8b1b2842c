"""What the token and bag-of-words systems share: the training loop of a recurrent language model over stream windows.

Lightning 2 leaves this to the user for recurrent models (it removed ``truncated_bptt_steps``): carrying the hidden
state from one window to the next and detaching it, one state per stream group when a window arrives as
micro-batches (``callbacks/accumulation.py``), resetting it at epoch boundaries, perplexity weighted by target
tokens (or words), the best-so-far perplexity for TensorBoard's HPARAMS tab, and building the optimizer and LR
schedule that LightningCLI injects. The network is built by the subclass and knows nothing of Lightning.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MeanMetric

from lm_lightning.data.windows import Batch
from lm_lightning.evaluation import nll


def detach_hidden(hidden: Any) -> Any:
    """Cut the graph between windows (truncated BPTT) without touching the values."""
    if hidden is None:
        return None
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return type(hidden)(detach_hidden(h) for h in hidden)


class StreamSystem(L.LightningModule):
    """Base of ``LanguageModel`` and ``BagLanguageModel``. A subclass saves its own hyper-parameters, calls
    ``self.attach(self.build_network())`` and implements ``_log_sample`` (what each validation shows as text)."""

    def __init__(self, optimizer: OptimizerCallable, lr_scheduler: Optional[LRSchedulerCallable]) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._hidden: dict[str, Any] = {}
        self._micro_losses: list[torch.Tensor] = []
        self._best_val_ppl = math.inf

    def attach(self, network: nn.Module) -> None:
        """The network, then the metrics (in this order, so the model summary lists the network first)."""
        self.network = network
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def build_network(self) -> nn.Module:
        """Override to train another network with the same ``forward(inputs, hidden) -> (logits, hidden)`` contract."""
        raise NotImplementedError

    def forward(self, inputs: Any, hidden: Any = None) -> tuple[torch.Tensor, Any]:
        return self.network(inputs, hidden)

    def on_fit_start(self) -> None:
        # TensorBoard's HPARAMS tab needs a metric to show runs side by side; Lightning's placeholder
        # "hp_metric" (-1) is turned off in favour of a real one, updated at every validation.
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.hparams, {"hp/best_val_ppl": math.nan})

    # --- training -------------------------------------------------------------------------------------
    def _loss(self, batch: Batch, stage: str) -> torch.Tensor:
        # Each stream group (a micro-batch, or the whole window) carries its own hidden state, kept under its own
        # key so any hidden-state layout works.
        key = f"{stage}/{batch.first_stream}"
        logits, hidden = self(batch.inputs, self._hidden.get(key))
        self._hidden[key] = detach_hidden(hidden)
        return nll(logits, batch.targets) / batch.divisor

    def _reset_hidden(self, stage: str) -> None:
        for key in [key for key in self._hidden if key.split("/")[0] == stage]:
            del self._hidden[key]

    def on_train_epoch_start(self) -> None:
        self._reset_hidden("train")  # each epoch re-reads the streams from their start

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, "train")
        window_loss = self._window_loss(loss.detach(), batch)
        self.log("train/loss", window_loss, prog_bar=True)
        self.log("train/ppl", window_loss.exp())
        return loss

    def _window_loss(self, loss: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean loss over the micro-batches of the current window so far (``loss`` itself for whole windows).

        Lightning writes step metrics at the optimizer step, i.e. after a window's last micro-batch, so
        ``train/loss`` is the loss of the whole effective batch: every group divides by the same share.
        """
        if batch.first_stream == 0:
            self._micro_losses = []
        self._micro_losses.append(loss)
        return torch.stack(self._micro_losses).mean()

    # --- validation and test --------------------------------------------------------------------------
    def _metric(self, stage: str) -> MeanMetric:
        return self.val_loss if stage == "val" else self.test_loss

    def _evaluate(self, batch: Batch, stage: str) -> None:
        # Weighted by the window's target tokens (words): the last window can be shorter, and perplexity is per token.
        self._metric(stage).update(self._loss(batch, stage), batch.divisor)

    def _log_evaluation(self, stage: str) -> torch.Tensor:
        metric = self._metric(stage)
        loss = metric.compute()
        metric.reset()
        self.log_dict({f"{stage}/loss": loss, f"{stage}/ppl": loss.exp(), **self._extra_metrics(stage)}, prog_bar=stage == "val")
        return loss

    def _extra_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """More ``{stage}/...`` metrics logged beside loss and perplexity (a baseline, for instance)."""
        return {}

    def on_validation_epoch_start(self) -> None:
        self._reset_hidden("val")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        loss = self._log_evaluation("val")
        if self.trainer.sanity_checking:
            return
        if self.trainer.state.fn == "fit":  # a stand-alone validate must not move the best-so-far
            self._best_val_ppl = min(self._best_val_ppl, float(loss.exp()))
            self.log("hp/best_val_ppl", self._best_val_ppl)
        if self.hparams.sample_length:
            self._log_sample()

    def _log_sample(self) -> None:
        """Log what the model says about the datamodule's prompt as TensorBoard text (after each validation)."""
        raise NotImplementedError

    def _log_text(self, tag: str, text: str) -> None:
        for logger in self.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text(tag, text, self.global_step)

    def on_test_epoch_start(self) -> None:
        self._reset_hidden("test")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # --- checkpoints and optimization -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_val_ppl"] = self._best_val_ppl  # so a resumed run keeps its best-so-far

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._best_val_ppl = checkpoint.get("best_val_ppl", math.inf)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/ppl"
        return {"optimizer": optimizer, "lr_scheduler": config}
