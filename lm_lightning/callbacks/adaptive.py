"""What the adaptive input and the adaptive softmax strategies share: their settings, the checks that need the run.

The layers are ``networks/adaptive.py``; the two strategies, one file each, say which module they replace and what
they do to the loss (``adaptive_input.py``, ``adaptive_softmax.py``).
"""

from __future__ import annotations

from typing import ClassVar, Optional

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lm_lightning.callbacks.strategy import MemoryStrategy, memory_strategies
from lm_lightning.errors import LMInputError
from lm_lightning.networks.adaptive import DEFAULT_DIV_VALUE, check_cutoffs, cluster_spans, default_cutoffs, install


def check_frequency_order(counts: np.ndarray, cutoffs: list[int], who: str) -> None:
    """Every word of a cluster is at least as frequent in the training split as every word of the next one (ids 0 and
    1, ``<unk>`` and ``<eos>``, are the head's whatever their counts); else one sentence saying so."""
    spans = cluster_spans(cutoffs, len(counts))
    for (start, stop), (next_start, next_stop) in zip(spans, spans[1:]):
        rarest = int(np.argmin(counts[max(start, 2) : stop])) + max(start, 2) if stop > 2 else None
        commonest = int(np.argmax(counts[next_start:next_stop])) + next_start
        if rarest is not None and counts[commonest] > counts[rarest]:
            raise LMInputError(
                f"{who} needs a vocabulary sorted by frequency, and this one is not: word id {commonest} ({counts[commonest]} "
                f"training tokens) is in a rarer cluster than id {rarest} ({counts[rarest]}); build the vocabulary from the "
                "training counts (lm_lightning.data.Vocabulary.build does) or leave the adaptive layers out."
            )


class AdaptiveLayerStrategy(MemoryStrategy):
    """Base of :class:`~lm_lightning.callbacks.adaptive_input.AdaptiveInput` and
    :class:`~lm_lightning.callbacks.adaptive_softmax.AdaptiveSoftmax`: a new layer in place of one network module."""

    #: The module the partner strategy replaces (the two tie their matrices when the network was tied).
    partner: ClassVar[str] = ""
    #: Words in the label ("adaptive softmax").
    title: ClassVar[str] = ""
    #: The layer it installs.
    layer: ClassVar[type[nn.Module]] = nn.Module

    def __init__(self, cutoffs: Optional[list[int]] = None, div_value: float = DEFAULT_DIV_VALUE) -> None:
        if not (isinstance(div_value, (int, float)) and 1 <= div_value < float("inf")):
            raise LMInputError(f"{type(self).__name__} div_value must be a number of at least 1, got {div_value!r}: give e.g. 4.")
        if cutoffs is not None:  # the vocabulary's size is checked once it is known (restructure)
            check_cutoffs(cutoffs, None, self._flag)
        self.cutoffs, self.div_value = cutoffs, float(div_value)
        self.resolved: Optional[list[int]] = cutoffs  # the cutoffs in use, once the vocabulary's size is known

    @property
    def _flag(self) -> str:
        return f"{type(self).__name__} cutoffs"

    def label(self) -> str:
        return f"{self.title} {self.resolved if self.resolved is not None else 'auto'}"

    def hparams(self) -> dict[str, object]:
        return {"cutoffs": ",".join(map(str, self.resolved or [])) or "auto", "div_value": self.div_value}

    def export_metadata(self) -> dict[str, object]:
        return {"cutoffs": self.resolved, "div_value": self.div_value}

    def build(self, network: nn.Module, vocab_size: int, cutoffs: list[int], div_value: float) -> nn.Module:
        """The new layer for ``network``."""
        raise NotImplementedError

    def restructure(self, system: nn.Module) -> None:
        name = type(self).__name__
        if not system.token_inputs:
            raise LMInputError(f"{name} clusters a token vocabulary; the bag path reads bags of words: leave it out of a bag-of-words run.")
        network = system.network
        current = getattr(network, self.replaces, None)
        if self.replaces in getattr(network, "replaced_modules", {}) and isinstance(current, self.layer):
            self.resolved = current.config["cutoffs"]
            return  # installed already (restructure runs before a checkpoint is loaded and again at setup)
        vocab_size = self.vocab_size_of(network)
        cutoffs, div_value = self.cutoffs, self.div_value
        partner = getattr(network, self.partner, None) if self.partner in getattr(network, "replaced_modules", {}) else None
        if partner is not None and partner.tied:  # a tied pair cuts alike: the side given cutoffs sets them for both
            if cutoffs is None:
                cutoffs, div_value = partner.config["cutoffs"], partner.config["div_value"]
            elif partner.default_cutoffs:
                config = {**partner.config, "cutoffs": check_cutoffs(cutoffs, vocab_size, self._flag), "div_value": div_value}
                install(network, self.partner, type(partner)(**config), tied=True)
        cutoffs = check_cutoffs(cutoffs if cutoffs is not None else default_cutoffs(vocab_size), vocab_size, self._flag)
        self.resolved = cutoffs
        layer = self.build(network, vocab_size, cutoffs, div_value)
        layer.default_cutoffs = self.cutoffs is None
        install(network, self.replaces, layer)

    def apply(self, system: nn.Module) -> None:
        self.restructure(system)

    def vocab_size_of(self, network: nn.Module) -> int:
        """The vocabulary's size, read from the module this side replaces, or one sentence naming what is missing."""
        raise NotImplementedError

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.apply(pl_module)
        network = pl_module.network
        name = type(self).__name__
        if getattr(getattr(network, self.replaces), "tied", False) and not any(
            s.replaces == self.partner for s in memory_strategies(trainer)
        ):
            rank_zero_info(
                f"{name} on a tied network: the {self.partner} keeps its full matrix, untied (add the adaptive "
                f"{self.partner} too, -c configs/memory/adaptive.yaml, and the two share their word matrices)."
            )
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "ids") and stage == "fit":
            counts = np.bincount(np.asarray(datamodule.ids("train")), minlength=datamodule.vocab_size)
            check_frequency_order(counts, self.resolved, name)
