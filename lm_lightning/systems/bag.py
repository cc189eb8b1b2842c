"""The bag-of-words path's LightningModule: the training system around a segment-level network (``networks/bag.py``)
fed by ``data/bag.py``.

From :class:`~lm_lightning.systems.base.StreamSystem`, unchanged: the hidden state carried and detached across
windows (one per stream group under ``MicroBatchAccumulation``), the loss (``evaluation.nll``: for bags, the
count-weighted negative log-likelihood of the next segment's words, so perplexity is per word), the best-so-far
``hp/best_val_ppl``, checkpoint hooks, optimizer and schedule. Added: validation and test log ``unigram_ppl`` beside
``ppl`` (train's add-one-smoothed unigram distribution scored on exactly the same target words, the baseline a model
of the next segment has to beat), and the likeliest words of the segment after the prompt, as text at each
validation (``samples/next_words``) and from ``predict``. There is no text generation.
"""

from __future__ import annotations

from typing import Optional

import torch
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from lm_lightning.data.batch import Bags, Batch
from lm_lightning.errors import LMInputError
from lm_lightning.systems.base import StreamSystem


class BagLanguageModel(StreamSystem):
    """Bag-of-words segments -> LSTM -> the words of the next segment, trained with truncated BPTT over segments.

    Args:
        network: The network to train, ``--model.network CLASS_PATH`` with ``--model.network.init_args.*`` (default in
            configs/bag_embedded.yaml: ``lm_lightning.networks.BagLSTMNetwork``); its ``vocab_size`` is set from the
            datamodule by the CLI.
        optimizer: Optimizer class and arguments, e.g. ``--model.optimizer AdamW --model.optimizer.lr 3e-3``.
        lr_scheduler: Optional schedule, stepped once per epoch (``ReduceLROnPlateau`` watches ``val/ppl``).
        sample_length: How many of the likeliest words of the segment after the datamodule's ``prompt`` are logged
            as text (``samples/next_words``) at each validation; 0 turns it off.
        predict_words: How many of the likeliest next-segment words ``predict`` lists.
    """

    token_inputs = False

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        sample_length: int = 10,
        predict_words: int = 15,
    ) -> None:
        super().__init__(network, optimizer, lr_scheduler)
        if sample_length < 0:
            raise LMInputError(f"--model.sample_length must be >= 0, got {sample_length}: give a number of words (0 turns it off).")
        if predict_words < 1:
            raise LMInputError(f"--model.predict_words must be a positive integer, got {predict_words}: give e.g. 15.")
        self.save_hyperparameters_and_network()
        self.val_unigram_loss = MeanMetric()
        self.test_unigram_loss = MeanMetric()
        self._unigram: Optional[torch.Tensor] = None

    # --- the unigram baseline beside every evaluation -------------------------------------------------
    def _unigram_metric(self, stage: str) -> MeanMetric:
        return self.val_unigram_loss if stage == "val" else self.test_unigram_loss

    def _evaluate(self, batch: Batch, stage: str) -> None:
        super()._evaluate(batch, stage)
        if self._unigram is not None:
            targets: Bags = batch.targets
            loss = -(targets.counts.to(self._unigram.dtype) * self._unigram[targets.indices]).sum() / batch.divisor
            self._unigram_metric(stage).update(loss, batch.divisor)

    def _extra_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        metric = self._unigram_metric(stage)
        metrics = {f"{stage}/unigram_ppl": metric.compute().exp()} if metric.update_count else {}
        metric.reset()
        return metrics

    def _load_unigram(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self._unigram is None and hasattr(datamodule, "unigram_log_probs"):
            self._unigram = datamodule.unigram_log_probs()
        if self._unigram is not None:
            self._unigram = self._unigram.to(self.device, torch.float32)  # float32: not every accelerator has float64

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._load_unigram()

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._load_unigram()

    # --- the likeliest next words ---------------------------------------------------------------------
    @torch.no_grad()
    def next_words(self, segments: Bags, count: int) -> str:
        """The ``count`` likeliest words of the segment after ``segments`` (one stream), with their probabilities."""
        was_training = self.training
        self.eval()
        logits, _ = self(move_data_to_device(segments, self.device))
        self.train(was_training)
        probs = logits[0, -1].float().softmax(-1)
        top = probs.topk(min(count, probs.numel()))
        words = self.trainer.datamodule.vocab.decode(top.indices.tolist())
        return ", ".join(f"{word} {p:.3f}" for word, p in zip(words, top.values.tolist()))

    def _log_sample(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "prompt_bags"):
            return
        words = self.next_words(datamodule.prompt_bags(), self.hparams.sample_length)
        self._log_text("samples/next_words", f"after {datamodule.hparams.prompt!r}: {words}")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, str]:
        words = self.next_words(batch.inputs, self.hparams.predict_words)
        return {"prompt": self.trainer.datamodule.hparams.prompt, "text": f"likeliest words of the next segment: {words}"}
