"""The token path's LightningModule: the training system around a token network (``networks/lstm.py`` by default,
any network that keeps ``networks/contract.py``'s contract by ``--model.network CLASS_PATH``).

Everything about training over stream windows comes from :class:`~lm_lightning.systems.base.StreamSystem`; this
class adds what is particular to tokens: text generation (a sample logged at each validation, and ``predict``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lm_lightning.data.batch import Batch
from lm_lightning.deploy.sampling import PREDICT_FLAGS, check_memory, check_new_tokens, check_sampling
from lm_lightning.generation import sample
from lm_lightning.systems.base import StreamSystem


class LanguageModel(StreamSystem):
    """A token language model trained with truncated backpropagation through time.

    Args:
        network: The network to train, ``--model.network CLASS_PATH`` with ``--model.network.init_args.*`` (default
            ``lm_lightning.networks.LSTMNetwork``: ``--model.network.help LSTMNetwork`` lists its sizes); its
            ``vocab_size`` is set from the datamodule by the CLI.
        optimizer: Optimizer class and arguments, e.g. ``--model.optimizer SGD --model.optimizer.lr 1``.
        lr_scheduler: Optional schedule, stepped once per epoch (``ReduceLROnPlateau`` watches ``val/ppl``).
        sample_length: Tokens of text generated and logged at each validation (0 turns it off), at most 100,000.
        max_new_tokens: Tokens generated per sample by ``predict``, at most 100,000 (``--data.num_prompts``: at most
            10,000 samples; their text is checked against free memory before the run).
        temperature: Sampling temperature: 0 = greedy, otherwise from 0.001 to 100.
        top_k: Sample only among the ``top_k`` most likely tokens; ``None`` for all.
        seed: Seed of the sampler, so generated text is reproducible.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        sample_length: int = 40,
        max_new_tokens: int = 60,
        temperature: float = 0.8,
        top_k: Optional[int] = 50,
        seed: int = 0,
    ) -> None:
        super().__init__(network, optimizer, lr_scheduler)
        check_new_tokens(sample_length, "--model.sample_length")
        check_sampling(max_new_tokens, temperature, top_k, None, PREDICT_FLAGS)  # --data.num_prompts: in setup
        self.save_hyperparameters_and_network()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if stage != "predict" or not hasattr(getattr(datamodule, "hparams", None), "num_prompts"):
            return
        # Before predict_dataloader() builds one batch per prompt: each prompt is generated alone (one stream), and
        # every sample's text is kept until the epoch ends and GenerationWriter writes them all.
        hp, prompts = self.hparams, datamodule.hparams.num_prompts
        check_sampling(hp.max_new_tokens, hp.temperature, hp.top_k, prompts, PREDICT_FLAGS)
        tokens = len(str(datamodule.hparams.prompt).split()) + 1 + hp.max_new_tokens  # the prompt's words, or <eos>
        check_memory(prompts, tokens, getattr(datamodule, "vocab_size", 0), PREDICT_FLAGS, streams=1)

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
