"""One line per validation on the console, for runs nobody watches through a progress bar.

With ``--trainer.enable_progress_bar false``, or with the output sent to a file (nohup, SLURM, CI: no terminal, so
the rich bar draws nothing), Lightning prints nothing between the model summary and the end of fit. This callback
prints, after each validation:

    epoch 2/15 · step 142 · train loss 4.528 · val ppl 106.28 · 9,992 tok/s · peak 626 MiB · 2 min 05 s left

Peak memory is ``hp/peak_memory_mib``'s (``memory/measure.py``: ``peak_memory_mib``): on a GPU run the GPU's peak
reserved memory; on the CPU the memory monitor's peak when it runs, else the process's peak RSS. Time left: the time
per optimizer step so far, validation included, times the steps left. With a progress bar on a terminal it stays
silent: the bar shows the same figures.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from lm_lightning.memory.measure import peak_memory_mib


def duration(seconds: float) -> str:
    """``45 s``, ``4 min 10 s``, ``2 h 05 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ValidationLine(Callback):
    """Args:
    always: Print the line even with a progress bar on a terminal.
    """

    def __init__(self, always: bool = False) -> None:
        self.always = always
        self.lines: list[str] = []
        self._start: Optional[float] = None
        self._first_step = 0

    def _active(self, trainer: L.Trainer) -> bool:
        return self.always or trainer.progress_bar_callback is None or not sys.stdout.isatty()

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._first_step = time.monotonic(), trainer.global_step  # a resumed run counts from here
        if self._active(trainer):
            total = trainer.estimated_stepping_batches
            steps = f"{int(total):,} optimizer steps" if math.isfinite(total) else "no step limit"
            print(f"Training: {trainer.max_epochs} epochs, {steps}; a line after each validation.", flush=True)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._active(trainer):
            return
        line = self.line(trainer)
        self.lines.append(line)
        print(line, flush=True)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Whatever the console: which checkpoint to keep and how to test it, the next thing a user does.
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "")
        if not best or not Path(best).is_file():
            return
        score = getattr(checkpoint, "best_model_score", None)
        figure = f" (val ppl {float(score):.2f})" if score is not None and getattr(checkpoint, "monitor", "") == "val/ppl" else ""
        # Not trainer.log_dir: under DDP it is a broadcast, which this rank-zero hook would wait on alone.
        folders = [Path(log_dir) for log_dir in (getattr(logger, "log_dir", None) for logger in trainer.loggers) if log_dir]
        config = next((f / "config.yaml" for f in [*folders, Path(best).parent.parent] if (f / "config.yaml").is_file()), None)
        print(f"Best checkpoint: {_shown(best)}{figure}.", flush=True)
        if config is not None:
            print(f"Test it: python -m lm_lightning test -c {_shown(config)} --ckpt_path {_shown(best)}", flush=True)

    def line(self, trainer: L.Trainer) -> str:
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", f"step {trainer.global_step:,}"]
        if "train/loss" in metrics:
            parts.append(f"train loss {float(metrics['train/loss']):.3f}")
        if "val/ppl" in metrics:
            parts.append(f"val ppl {float(metrics['val/ppl']):.2f}")
        tokens = next((c.tokens_per_sec for c in trainer.callbacks if getattr(c, "tokens_per_sec", None)), None)
        if tokens is not None:
            parts.append(f"{tokens:,.0f} tok/s")
        peak = peak_memory_mib(trainer)
        if peak is not None:
            parts.append(f"peak {peak:,.0f} MiB")
        left = self.seconds_left(trainer)
        if left is not None:
            parts.append(f"{duration(left)} left")
        return " · ".join(parts)

    def seconds_left(self, trainer: L.Trainer) -> Optional[float]:
        total, done = trainer.estimated_stepping_batches, trainer.global_step - self._first_step
        if self._start is None or done <= 0 or not math.isfinite(total):
            return None
        return (time.monotonic() - self._start) / done * max(0, total - trainer.global_step)


def _shown(path: str | Path) -> str:
    """``path`` relative to the working folder when it is inside it (what the user would type), else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
