"""The LightningModule of the bag-of-words path: :class:`LanguageModel`'s training system around a segment-level
network (``models/bow.py``) fed by ``data/bow.py``.

Inherited unchanged: the hidden state carried and detached across windows, one state per stream group under
``MicroBatchAccumulation``, reset at every epoch, ``train/loss`` over a window's micro-batches, the best-so-far
``hp/best_val_ppl``, checkpoint hooks, optimizer and schedule. Changed: the loss is the count-weighted negative
log-likelihood of the next segment's words, perplexity is per word (weighted by words, not segments), and
validation and test log ``unigram_ppl`` beside ``ppl``: train's add-one-smoothed unigram distribution scored on
exactly the same target words, the baseline a model of the next segment has to beat. ``predict`` lists the
likeliest words of the segment after the prompt, and each validation logs them as text (``samples/next_words``);
there is no text generation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from lm_lightning.errors import LMInputError
from lm_lightning.models.bow import BagOfWordsLSTM, Bags, BagWeighting, bag_nll
from lm_lightning.system import LanguageModel, detach_hidden


class BoWLanguageModel(LanguageModel):
    """Bag-of-words segments -> LSTM -> the words of the next segment, trained with truncated BPTT over segments.

    Args:
        vocab_size: Set from the datamodule by the CLI; give it only when using the class on its own.
        embedding_dim: Width of the word vectors, summed (or averaged) into one vector per segment.
        hidden_dim: Width of each LSTM layer.
        num_layers: Stacked LSTM layers.
        dropout: Dropout on segment vectors, between LSTM layers and before the decoder.
        tie_weights: Decode with the bag embedding matrix (Press & Wolf 2017); needs embedding_dim == hidden_dim.
        bag_weighting: ``sum``: a segment is the count-weighted sum of its word vectors; ``mean``: their mean.
        optimizer: Optimizer class and arguments, e.g. ``--model.optimizer AdamW --model.optimizer.lr 3e-3``.
        lr_scheduler: Optional schedule, stepped once per epoch (``ReduceLROnPlateau`` watches ``val/ppl``).
        sample_length: How many of the likeliest words of the segment after the datamodule's ``prompt`` are logged
            as text (``samples/next_words``) at each validation; 0 turns it off.
        predict_words: How many of the likeliest next-segment words ``predict`` lists.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 128,
        hidden_dim: int = 128,
        num_layers: int = 1,
        dropout: float = 0.3,
        tie_weights: bool = False,
        bag_weighting: BagWeighting = "sum",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        sample_length: int = 10,
        predict_words: int = 15,
    ) -> None:
        if sample_length < 0 or predict_words < 1:
            raise LMInputError(f"sample_length must be >= 0 and predict_words >= 1, got {sample_length} and {predict_words}.")
        super().__init__(vocab_size, embedding_dim, hidden_dim, num_layers, dropout, tie_weights, optimizer, lr_scheduler, sample_length=0)
        # Saved again from this frame only: the token model's sampling arguments are not this class's, and a
        # checkpoint must re-create it from its own arguments (load_from_checkpoint calls cls(**hparams)).
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.val_unigram_loss = MeanMetric()
        self.test_unigram_loss = MeanMetric()
        self._unigram: Optional[torch.Tensor] = None

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return BagOfWordsLSTM(hp.vocab_size, hp.embedding_dim, hp.hidden_dim, hp.num_layers, hp.dropout, hp.tie_weights, hp.bag_weighting)

    # --- training / evaluation ------------------------------------------------------------------------
    def _loss(self, batch: tuple, stage: str) -> torch.Tensor:
        """Per-word negative log-likelihood of the target segments (``batch``: see ``data/bow.py``'s ``BagWindows``)."""
        inputs, targets, *group = batch
        key = f"{stage}/{group[0]}" if group else stage
        logits, hidden = self(inputs, self._hidden.get(key))
        self._hidden[key] = detach_hidden(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        # A micro-batch divides by its share of the whole window's words, not by its own: the mean of the window's
        # micro-batch losses (what Lightning's accumulation sums up) is then the per-word loss of the whole window.
        words = group[1] if group else targets.words()
        return bag_nll(logits, targets) / words

    def _unigram_loss(self, targets: Bags) -> Optional[torch.Tensor]:
        if self._unigram is None:
            return None
        return -(targets.counts.to(self._unigram.dtype) * self._unigram[targets.indices]).sum() / targets.words()

    def _evaluate(self, batch: tuple, stage: str, loss: MeanMetric, unigram: MeanMetric) -> None:
        words = batch[1].words()  # perplexity is per word: every window is weighted by its target words
        loss.update(self._loss(batch, stage), words)
        unigram_loss = self._unigram_loss(batch[1])
        if unigram_loss is not None:
            unigram.update(unigram_loss, words)

    def _log_evaluation(self, stage: str, loss: MeanMetric, unigram: MeanMetric) -> torch.Tensor:
        value = loss.compute()
        loss.reset()
        metrics = {f"{stage}/loss": value, f"{stage}/ppl": value.exp()}
        if unigram.update_count:
            metrics[f"{stage}/unigram_ppl"] = unigram.compute().exp()
        unigram.reset()
        self.log_dict(metrics, prog_bar=stage == "val")
        return value

    def _load_unigram(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self._unigram is None and hasattr(datamodule, "unigram_log_probs"):
            self._unigram = datamodule.unigram_log_probs()
        if self._unigram is not None:
            self._unigram = self._unigram.to(self.device, torch.float32)  # float32: not every accelerator has float64

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._load_unigram()

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_loss, self.val_unigram_loss)

    def on_validation_epoch_end(self) -> None:
        self._after_validation(self._log_evaluation("val", self.val_loss, self.val_unigram_loss))

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._load_unigram()

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_loss, self.test_unigram_loss)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", self.test_loss, self.test_unigram_loss)

    # --- prediction -----------------------------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise LMInputError("A bag-of-words model predicts the words of the next segment, not a sequence of tokens: use `predict`, which lists them.")

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
        text = f"after {datamodule.hparams.prompt!r}: {self.next_words(datamodule.prompt_bags(), self.hparams.sample_length)}"
        for logger in self.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text("samples/next_words", text, self.global_step)

    def predict_step(self, batch: Bags, batch_idx: int) -> dict[str, str]:
        words = self.next_words(batch, self.hparams.predict_words)
        return {"prompt": self.trainer.datamodule.hparams.prompt, "text": f"likeliest words of the next segment: {words}"}
