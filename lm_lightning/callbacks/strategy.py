"""The memory-strategy contract: what a memory trick is to the rest of the template, written once.

A memory strategy is a Lightning :class:`~lightning.pytorch.callbacks.Callback` that changes how the run trains
(what it holds, what it recomputes, what it stores in fewer bits) and describes itself through this class. Everything
that reports on or plans a run asks the strategies in ``trainer.callbacks`` through these methods and names none of
them: the HPARAMS row and ``compare`` (``name``, :meth:`label`, :meth:`hparams`), the export's manifest
(:meth:`export_metadata`, :meth:`export_quantization`), ``estimate``'s prediction (:meth:`probe`) and
``fit --weights_from`` (:meth:`start_from_trained`). So a new strategy is one file, one preset and one parity test:

    # my_strategy.py, anywhere on PYTHONPATH
    class MyStrategy(MemoryStrategy):
        name = "my_strategy"

        def __init__(self, level: int = 1) -> None:   # typed arguments: --trainer.callbacks+=my_strategy.MyStrategy
            self.level = level

        def label(self) -> str:
            return f"my strategy {self.level}"

        def apply(self, system) -> None:   # called at setup, and by estimate on the copy of the system it measures
            ...

    python -m lm_lightning fit --trainer.callbacks+=my_strategy.MyStrategy --trainer.callbacks.level 2

A strategy that changes the system's structure (how the loss or the network runs) does it in :meth:`apply`, through
the hooks that :class:`~lm_lightning.systems.base.StreamSystem` documents (``loss_head``, ``window_runner``) or
through the network's own modules (a strategy that swaps a module for a new layer does that in :meth:`restructure`,
which runs before a checkpoint is loaded); a strategy that acts during training (a schedule) uses Lightning's hooks as any
callback does, and tells ``estimate`` its costliest state in :meth:`probe`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

if TYPE_CHECKING:
    from lm_lightning.systems.base import StreamSystem


class MemoryStrategy(Callback):
    """Base class of every memory strategy (see the module docstring for the contract and an example)."""

    #: The strategy's namespace: its HPARAMS columns are ``<name>/<setting>``, its manifest entry ``strategies.<name>``.
    name: ClassVar[str] = ""
    #: The run trains for its export (pruned zeros to store sparsely, weights trained for integer rounding): the export
    #: step then runs at the end of fit unless ``--export.enabled false``.
    trains_for_export: ClassVar[bool] = False

    def label(self) -> str:
        """A few words for the "Memory strategies" column, ``compare`` and benchmark rows (e.g. ``"pruning 80%"``);
        ``""`` for a strategy that saves nothing by itself (a monitor)."""
        return ""

    def hparams(self) -> dict[str, Any]:
        """The settings that tell two runs apart, flat (numbers, text, booleans), for the HPARAMS row."""
        return {}

    def export_metadata(self) -> dict[str, Any]:
        """What the export's manifest records about this strategy; ``{}`` records only that it ran."""
        return {}

    def export_quantization(self) -> Optional[tuple[int, int]]:
        """``(bits, group_size)`` when this strategy trained the weights for an integer export (the export step then
        writes that format unless ``--export.bits`` says otherwise); ``None`` otherwise."""
        return None

    #: The network module this strategy puts a new layer in place of (``"decoder"``, ``"embedding"``), ``""`` for none;
    #: two strategies of a run cannot replace the same one.
    replaces: ClassVar[str] = ""

    def restructure(self, system: StreamSystem) -> None:
        """Swap the network's modules for this strategy's own (what its state dict holds), idempotently. Called before
        any checkpoint is loaded into the system (``--ckpt_path``, ``--weights_from``, ``export``) and by :meth:`apply`
        implementations that need it; the default swaps nothing."""

    def apply(self, system: StreamSystem) -> None:
        """Change ``system`` (its network or its hooks) as this strategy trains it. The base :meth:`setup` calls it at
        every stage; ``estimate`` calls it (through :meth:`probe`) on the copy of the system it measures."""

    def probe(self, system: StreamSystem) -> None:
        """Put ``system``, a copy that ``estimate`` measures for a few steps, in the state of this strategy that holds
        the most memory during the fit (pruning: its masks exist; quantization-aware training: on). Defaults to
        :meth:`apply`."""
        self.apply(system)

    def start_from_trained(self) -> None:
        """``fit --weights_from CKPT``: this run starts from trained weights (a finishing phase), not from scratch."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.apply(pl_module)


def memory_strategies(trainer: L.Trainer) -> list[MemoryStrategy]:
    """The memory strategies among the trainer's callbacks, in their order."""
    return [c for c in trainer.callbacks if isinstance(c, MemoryStrategy)]
