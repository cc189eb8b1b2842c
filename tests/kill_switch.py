"""Test-only faults: a callback that SIGKILLs its own process at a chosen point (kill-and-resume tests), and one that
makes the weights NaN at a chosen step.

Selected in a subprocess with ``--trainer.callbacks+=kill_switch.KillAt --trainer.callbacks.point validation ...``
(``tests/`` is on the subprocesses' PYTHONPATH, see conftest). A SIGKILL cannot be caught: no ``finally``, no
Lightning exception hook, no flush runs, exactly as when the machine or the scheduler kills a job.

Points:
    prepare: while the token cache is written (after the first ``.npy`` of the entry, halfway through the next).
    train_batch: after training batch ``batch`` of epoch ``epoch`` (mid-epoch).
    validation: after validation batch ``batch`` of epoch ``epoch`` (not the sanity check).
    save: inside the write of ``target`` (a checkpoint name, e.g. ``last.ckpt``) at epoch ``epoch``: half the bytes
        are in the temporary file, flushed to disk, when the process dies.
"""

from __future__ import annotations

import io
import os
import signal
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

POINTS = ("prepare", "train_batch", "validation", "save")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(Callback):
    def __init__(self, point: str, epoch: int = 0, batch: int = 0, target: str = "last.ckpt") -> None:
        if point not in POINTS:
            raise ValueError(f"point must be one of {POINTS}, got {point!r}")
        self.point, self.epoch, self.batch, self.target = point, epoch, batch, target
        self._trainer: Optional[L.Trainer] = None
        if point == "save":
            _patch_torch_save(self)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.point == "train_batch" and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            die()

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if (
            self.point == "validation"
            and not trainer.sanity_checking
            and trainer.current_epoch == self.epoch
            and batch_idx == self.batch
        ):
            die()

    def saving_target(self, f: Any) -> bool:
        name = os.path.basename(str(getattr(f, "name", "")))
        return (
            self._trainer is not None
            and self._trainer.current_epoch == self.epoch
            and (name == self.target or name.startswith(f".{self.target}."))
        )


class PoisonAt(Callback):
    """Set the first weight of the network to ``value`` (NaN by default) at training batch ``batch`` of ``epoch``:
    ``before`` the batch (its loss is not finite) or ``after`` it (the weights are, the loss was)."""

    def __init__(self, epoch: int, batch: int, when: str = "before", value: float = float("nan")) -> None:
        self.epoch, self.batch, self.when, self.value = epoch, batch, when, value

    def _poison(self, trainer: L.Trainer, pl_module: L.LightningModule, batch_idx: int, when: str) -> None:
        if when == self.when and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = self.value

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._poison(trainer, pl_module, batch_idx, "before")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._poison(trainer, pl_module, batch_idx, "after")


class OwnCheckpointIO(TorchCheckpointIO):
    """A user's own checkpoint plugin (``--trainer.plugins kill_switch.OwnCheckpointIO``): the CLI must keep it."""


def _patch_torch_save(switch: KillAt) -> None:
    real_save = torch.save

    def save_half_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not switch.saving_target(f):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        die()

    torch.save = save_half_then_die


def _patch_numpy_save(signum: int = signal.SIGKILL) -> None:
    """Die (or get ``signum``) halfway through the second ``.npy`` a token-cache build writes."""
    real_save, calls = np.save, []

    def save_then_die(file: Any, arr: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(file)
        if len(calls) < 2:
            return real_save(file, arr, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(buffer, arr, *args, **kwargs)
        with open(file, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signum)

    np.save = save_then_die


# The token cache is built while LightningCLI instantiates the data module, which may come before the callbacks:
# the prepare point is armed when this module is imported (jsonargparse imports it while parsing the arguments).
if os.environ.get("LM_TEST_KILL_AT") == "prepare":
    _patch_numpy_save()
elif os.environ.get("LM_TEST_KILL_AT") == "prepare_sigterm":  # a scheduler's SIGTERM at the same point
    _patch_numpy_save(signal.SIGTERM)


def run_cli(args: list[str], cwd: str, log_path: str, kill_in_prepare: bool = False) -> None:
    """``python -m lm_lightning ARGS`` in a process forked from a server that has already imported the CLI (see
    tests/test_resume.py): the same ``main``, without paying the ~6 s import for each of a test's runs."""
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.chdir(cwd)
    if kill_in_prepare:
        _patch_numpy_save()
    from lm_lightning.cli import main

    main(args)
