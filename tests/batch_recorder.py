"""A test-only callback (tests/test_ddp.py): the batches each DDP rank trained and validated on, its own training
loss, the random numbers its next dropout masks would come from, and its final metrics, written to
``<folder>/rank<global rank>.json``.

Passed to a ``python -m lm_lightning fit`` subprocess as ``--trainer.callbacks+=batch_recorder.BatchRecorder``
(conftest puts tests/ on the subprocess's PYTHONPATH).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class BatchRecorder(Callback):
    def __init__(self, folder: str = "batches") -> None:
        self.folder = Path(folder)
        self.record: dict[str, Any] = {"train": [], "rank_loss": [], "val": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After on_fit_start (where each rank seeds its dropout): the next uniforms of torch's global generator, read
        # from a copy of its state so that recording draws nothing the run would otherwise draw.
        copy = torch.Generator().set_state(torch.get_rng_state())
        self.record["next_uniforms"] = torch.rand(4, generator=copy).tolist()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.record["train"].append([trainer.current_epoch, batch.targets.tolist()])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record["rank_loss"].append(float(outputs["loss"]))  # this rank's own loss, before any reduction

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self.record["val"].append([trainer.current_epoch, batch.targets.tolist()])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record.update(
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            metrics={name: float(value) for name, value in trainer.callback_metrics.items()},
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
