"""Print the text that ``predict`` generates and write it to a file (the run's log folder by default)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from lm_lightning.errors import LMInputError
from lm_lightning.io import atomic_write_text, disk_full


class GenerationWriter(BasePredictionWriter):
    """Args:
    output_path: File for the generated samples; default ``<log_dir>/generated.txt``.
    """

    def __init__(self, output_path: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_path = output_path
        self.written: Optional[Path] = None

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        samples = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        text = "\n\n".join(f"--- sample {i} (prompt: {s['prompt']!r})\n{s['text']}" for i, s in enumerate(samples))
        path = Path(self.output_path or Path(trainer.log_dir or ".") / "generated.txt")
        if trainer.is_global_zero:
            print(text)
            try:
                atomic_write_text(path, text + "\n")
            except OSError as err:
                if not disk_full(err):
                    raise
                raise LMInputError(
                    f"The disk holding {path.parent} is full, so {path.name} was not written (the samples are printed "
                    "above): free space there, or give the file another place with "
                    "--trainer.callbacks+=GenerationWriter --trainer.callbacks.output_path FILE."
                ) from None
            print(f"\nWrote {len(samples)} sample(s) to {path}")
        self.written = path
