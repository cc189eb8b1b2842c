"""What the token and bag-of-words systems share: the training loop of a recurrent language model over stream windows.

Lightning 2 leaves this to the user for recurrent models (it removed ``truncated_bptt_steps``): carrying the hidden
state from one window to the next and detaching it, one state per stream group when a window arrives as
micro-batches (``callbacks/accumulation.py``), resetting it at epoch boundaries, perplexity weighted by target
tokens (or words), the best-so-far perplexity for TensorBoard's HPARAMS tab, and building the optimizer and LR
schedule that LightningCLI injects. The network is injected (``--model.network CLASS_PATH``; ``networks/contract.py``
says what it must do) and knows nothing of Lightning.

Memory strategies that change how a window's loss is computed (``callbacks/``) do it through two hooks, ``None`` for
the plain path: ``loss_head`` computes the summed loss from the network's features instead of its logits (the chunked
loss), and ``window_runner`` runs the network over the window (recomputation runs it in checkpointed time segments).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar, Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MeanMetric

from lm_lightning.data.batch import Batch
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import nll
from lm_lightning.memory.measure import peak_memory_mib
from lm_lightning.networks.contract import build_network, network_spec
from lm_lightning.reports.hparams import nan_metrics, run_hparams
from lm_lightning.storage.checkpoints import gather_rng_states, restore_rng_states
from lm_lightning.systems.finite import UncheckedLosses, reading_waits

# (network, features, targets) -> summed negative log-likelihood: the loss from the features, not the logits.
LossHead = Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]
# (step, inputs, hidden) -> (outputs, hidden), where step is the network's forward or features.
WindowRunner = Callable[[Callable[..., tuple[torch.Tensor, Any]], Any, Any], tuple[torch.Tensor, Any]]


def detach_hidden(hidden: Any) -> Any:
    """Cut the graph between windows (truncated BPTT) without touching the values."""
    if hidden is None:
        return None
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return type(hidden)(detach_hidden(h) for h in hidden)


def seed_dropout_per_rank(global_rank: int) -> None:
    """At fit start, restart torch's generator at the run's seed plus the global rank: each DDP rank draws its own
    dropout masks, and rank 0 draws those of a 1-process run.

    ``seed_everything`` gives every rank the same seed, so without the offset every rank would drop the same units of
    its own streams, less regularization than one process drawing masks for all of them. The restart also on rank 0
    and in a 1-process run because Lightning's DDP set-up re-seeds every rank (``reset_seed``) while one process
    continues from where weight init left the generator. Weights are unaffected (built before fit; DDP broadcasts
    rank 0's), and a resumed run puts back each rank's saved random state after this.
    """
    torch.manual_seed((torch.initial_seed() + global_rank) % 2**64)


class StreamSystem(L.LightningModule):
    """Base of ``LanguageModel`` and ``BagLanguageModel``. A subclass saves its hyper-parameters with
    :meth:`save_hyperparameters_and_network` and implements ``_log_sample`` (what each validation shows as text)."""

    #: Windows are ``(streams, time)`` token-id tensors (False on the bag path): strategies that cut windows in time or
    #: score next tokens read it.
    token_inputs: ClassVar[bool] = True

    def __init__(self, network: nn.Module, optimizer: OptimizerCallable, lr_scheduler: Optional[LRSchedulerCallable]) -> None:
        super().__init__()
        # A checkpoint written outside the CLI stores the network as {"class_path", "init_args"}.
        self.network = build_network(network) if isinstance(network, dict) else network
        self.val_loss = MeanMetric()  # after the network, so the model summary lists the network first
        self.test_loss = MeanMetric()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.loss_head: Optional[LossHead] = None  # set by a memory strategy (the chunked loss)
        self.window_runner: Optional[WindowRunner] = None  # set by a memory strategy (recomputation)
        self._hidden: dict[str, Any] = {}
        self._micro_losses: list[torch.Tensor] = []
        self._unchecked_losses = UncheckedLosses()  # NaN checks not read yet (systems/finite.py)
        self._best_val_ppl = math.inf
        self._rng_states: Optional[list[dict[str, Any]]] = None  # from a loaded checkpoint, put back at train start

    def save_hyperparameters_and_network(self) -> None:
        """The subclass's arguments as hyper-parameters (a checkpoint rebuilds the system from them), the network as
        its configuration: LightningCLI records ``{"class_path", "init_args"}``; a network built in Python is
        recorded the same way from its class and ``config``."""
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"], frame=inspect.currentframe().f_back)
        if isinstance(self.hparams.get("network"), nn.Module):
            self.hparams["network"] = network_spec(self.network)

    def forward(self, inputs: Any, hidden: Any = None) -> tuple[torch.Tensor, Any]:
        return self.network(inputs, hidden)

    def setup(self, stage: str) -> None:
        # Lightning would log this module's and the datamodule's hyper-parameters as they are (LightningCLI's
        # _class_path and _instantiator, the sampling settings), at every stage; on_fit_start logs a run's row instead
        # (hparams.py), and validate/test/predict, which log into the run they evaluate, leave it as fit wrote it.
        self._log_hyperparams = False
        if self.trainer.datamodule is not None:
            self.trainer.datamodule._log_hyperparams = False

    def on_fit_start(self) -> None:
        # TensorBoard's HPARAMS tab: one row per run (flat settings), and the figures to sort it by, declared now and
        # filled in as they become known (Lightning's placeholder "hp_metric" of -1 is turned off in the CLI).
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(run_hparams(self.trainer, self), nan_metrics())
        seed_dropout_per_rank(self.trainer.global_rank)

    def on_train_end(self) -> None:
        peak = peak_memory_mib(self.trainer)
        if peak is not None:
            for logger in self.loggers:  # self.log is not allowed here; the logger is (rank zero only)
                logger.log_metrics({"hp/peak_memory_mib": peak}, step=self.global_step)

    # --- training -------------------------------------------------------------------------------------
    def _loss(self, batch: Batch, stage: str) -> torch.Tensor:
        # Each stream group (a micro-batch, or the whole window) carries its own hidden state, kept under its own
        # key so any hidden-state layout works.
        key = f"{stage}/{batch.first_stream}"
        total, hidden = self._nll(batch.inputs, batch.targets, self._hidden.get(key))
        self._hidden[key] = detach_hidden(hidden)
        return total / batch.divisor

    def _nll(self, inputs: Any, targets: Any, hidden: Any) -> tuple[torch.Tensor, Any]:
        """Summed negative log-likelihood of ``targets`` and the new hidden state, through the strategies' hooks."""
        step = self.network if self.loss_head is None else self.network.features
        outputs, hidden = step(inputs, hidden) if self.window_runner is None else self.window_runner(step, inputs, hidden)
        return (nll(outputs, targets) if self.loss_head is None else self.loss_head(self.network, outputs, targets)), hidden

    def _reset_hidden(self, stage: str) -> None:
        for key in [key for key in self._hidden if key.split("/")[0] == stage]:
            del self._hidden[key]

    def on_train_epoch_start(self) -> None:
        self._reset_hidden("train")  # each epoch re-reads the streams from their start

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, "train")
        self._check_finite(loss, batch_idx)
        # The mean over DDP ranks (each one's own otherwise): every rank holds as many target tokens (StreamWindows),
        # so it is the loss one process computes at the same global batch, and what DDP's averaged gradients minimize.
        window_loss = self.trainer.strategy.reduce(self._window_loss(loss.detach(), batch), reduce_op="mean")
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
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._check_finite_weights()  # before the text sample (which cannot sample from NaN) and the checkpoint

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
        """TensorBoard renders text as Markdown: indented four spaces, it is a code block, shown as written
        (``__init__`` stays ``__init__``, lines stay lines, ``*`` and ``#`` stay characters)."""
        block = "\n".join("    " + line for line in text.splitlines() or [""])
        for logger in self.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text(tag, block, self.global_step)

    def on_test_epoch_start(self) -> None:
        self._reset_hidden("test")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        loss = self._log_evaluation("test")
        self.log("hp/test_ppl", loss.exp())

    # --- checkpoints and optimization -----------------------------------------------------------------
    def _check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        # Before the optimizer step: the weights (and any checkpoint written later) stay those of the last good step.
        # On CPU read now, before backward; on a GPU, where a read waits for the device, once per optimizer step.
        self._unchecked_losses.add(loss, batch_idx, self.global_step, self.current_epoch)
        if not reading_waits(loss.device):
            self._unchecked_losses.check(self.trainer)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self._unchecked_losses.check(self.trainer)  # the flags a GPU run kept since the last step (none on CPU)

    def _check_finite_weights(self) -> None:
        # A finite loss can still leave non-finite weights (an infinite gradient norm); the next loss would stop the
        # run, but at the end of an epoch validation and the checkpoint come first.
        if not all(bool(torch.isfinite(p).all()) for p in self.parameters()):
            raise LMInputError(
                f"The weights are not finite at step {self.global_step} (epoch {self.current_epoch}): lower the learning rate "
                "(--model.optimizer.init_args.lr) or clip harder (--trainer.gradient_clip_val); checkpoints written before "
                "this step are kept."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_finite_weights()  # never a checkpoint of a NaN state
        checkpoint["best_val_ppl"] = self._best_val_ppl  # so a resumed run keeps its best-so-far
        # Exact resume: the dropout masks after a resume are those the uninterrupted run draws. A list indexed by
        # global rank (every rank draws its own masks); see checkpointing.gather_rng_states.
        checkpoint["rng_states"] = gather_rng_states(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._best_val_ppl = checkpoint.get("best_val_ppl", math.inf)
        self._rng_states = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Not at load time: model set-up, the sanity check and callbacks run between load and the first batch, and
        # the saved state is the one right before the first batch of the next epoch.
        if self._rng_states is not None:
            restore_rng_states(self._rng_states, self.trainer)
            self._rng_states = None

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Optional[float] = None, gradient_clip_algorithm: Optional[str] = None
    ) -> None:
        # torch's clip_grad_norm_ has no sparse kernel (linalg_vector_norm on SparseCPU): with sparse gradients
        # (callbacks/sparse_gradients.py) the same rule, by hand.
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not gradient_clip_val or not any(grad.is_sparse for grad in grads):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
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

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/ppl"
        return {"optimizer": optimizer, "lr_scheduler": config}
