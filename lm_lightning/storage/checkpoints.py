"""Checkpoints that survive kills and full disks, and resume bit for bit.

What Lightning (2.6) lacks and this module adds:

* :class:`AtomicCheckpointIO`: Lightning's ``TorchCheckpointIO`` serializes to memory and then writes the target
  in place, so a kill or a full disk during the write (or during the copy that a cross-file-system move is)
  leaves a truncated ``last.ckpt`` and the previous good one is gone. Here every save goes to a temporary file
  *in the target folder*, is flushed and fsynced, and only then renamed over the target (``os.replace``: atomic on
  one file system). The CLI installs it on every trainer (:func:`install_atomic_checkpoint_io`).
* :class:`BestAndLastCheckpoint`: ``ModelCheckpoint`` writes ``last.ckpt`` only at steps where it also wrote a
  top-k checkpoint, so after an epoch that did not improve ``val/ppl`` ``last.ckpt`` is an older state. This one
  writes it after every epoch, and removes temporary files that killed runs left behind.
* RNG state per rank (:func:`gather_rng_states`, :func:`restore_rng_states`): the dropout masks of a resumed run
  are those the uninterrupted run would have drawn. ``StreamSystem`` stores them in its checkpoints.

Reading a checkpoint back (``--ckpt_path``) is ``loading.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import uuid
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_warn

from lm_lightning.errors import LMInputError
from lm_lightning.io import disk_full

log = logging.getLogger(__name__)

# Written as ".<target name>.<pid>.<random>.tmp" next to the target: hidden, and the pid tells a leftover of a killed
# run (its process is gone) from the save in progress of a live one.
TMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


# --- atomic writes ------------------------------------------------------------------------------------------
def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible (nor needed) on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are all-or-nothing: temporary file in the target folder, flush, fsync,
    ``os.replace``. A failed save leaves the previous file and no temporary file; a full disk or a read-only
    folder is one :class:`LMInputError`. Remote paths (``s3://...``) keep Lightning's own write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _write_error(target.parent, err) from None
        tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            # "x": never another process's file; open() creates it 0o666 less the umask, the mode Lightning's write gives.
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except (OSError, RuntimeError) as err:  # RuntimeError: torch's zip writer, when the disk filled under it
            raise _write_error(target.parent, err) from None
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_folder(target.parent)


def _write_error(folder: Path, err: Exception) -> Exception:
    if disk_full(err):
        return LMInputError(
            f"The disk holding {folder} is full, so the checkpoint was not written (the previous one is kept): free "
            "space there or point --trainer.default_root_dir to another disk."
        )
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LMInputError(
            f"Checkpoints cannot be written to {folder} ({os.strerror(err.errno)}): make it writable or point "
            "--trainer.default_root_dir to a writable folder."
        )
    return err


def install_atomic_checkpoint_io(strategy: Strategy) -> None:
    """Make ``strategy`` save through :class:`AtomicCheckpointIO`, unless the user chose another ``CheckpointIO``
    (``--trainer.plugins``); a wrapper such as ``AsyncCheckpointIO`` around the default gets the atomic one inside."""
    io = strategy.checkpoint_io
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif isinstance(io, _WrappingCheckpointIO) and type(io.checkpoint_io) is TorchCheckpointIO:
        # The wrapper's setter refuses to replace a base it already has; Lightning gave it the default one.
        io._checkpoint_io = AtomicCheckpointIO()


def remove_stale_temporary_files(folder: Path) -> list[Path]:
    """Delete the temporary checkpoint files of processes that no longer run (killed during a save)."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = TMP_PATTERN.match(path.name)
        if match is None or _is_running(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("Removed %d temporary checkpoint file(s) left by a killed run in %s.", len(removed), folder)
    return removed


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


# --- last.ckpt after every epoch --------------------------------------------------------------------------
class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the last completed epoch (validation included).

    Lightning 2.6 saves ``last`` only when the same step also saved a top-k checkpoint, so an epoch that does not
    improve the monitored metric leaves ``last.ckpt`` at an older state (issue 8: a 3-epoch run ended at step 60 with
    ``last.ckpt`` at step 40). The state key stays ``ModelCheckpoint{...}`` so older checkpoints resume into it.
    """

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.is_global_zero:  # after the restore, when trainer.ckpt_path is known
            folders = {Path(self.dirpath)} if self.dirpath else set()
            if _is_local_file(trainer.ckpt_path):  # a resumed run writes to a new run folder
                folders.add(Path(trainer.ckpt_path).parent)
            for folder in folders:
                remove_stale_temporary_files(folder)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._save_top_k_and_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._defer_save_until_validation:  # a step/time-triggered save waiting for val/ppl: Lightning's own path
            super().on_validation_end(trainer, pl_module)
        elif not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_top_k_and_last(trainer)

    def _save_top_k_and_last(self, trainer: L.Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        if self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


def _is_local_file(path: Any) -> bool:
    return isinstance(path, (str, Path)) and "://" not in str(path) and Path(path).is_file()


# --- random-number state ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's global generators, as tensors and plain values (``torch.load(weights_only=True)`` reads it)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def gather_rng_states(trainer: L.Trainer) -> list[dict[str, Any]]:
    """Every rank's generators, indexed by global rank (all ranks call this while a checkpoint is assembled;
    only rank 0 writes it). Under DDP each rank draws its own dropout masks, so each needs its own state back."""
    state = rng_state()
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [state]
    states: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def restore_rng_states(states: list[dict[str, Any]], trainer: L.Trainer) -> None:
    """Put back this rank's generators as the checkpoint saved them (at the start of the resumed training, after
    the sanity check and anything else that ran between load and the first batch)."""
    if len(states) != trainer.world_size:
        rank_zero_warn(
            f"The checkpoint holds the random-number state of {len(states)} rank(s) and this run has {trainer.world_size}: "
            "ranks without a saved state keep their seeded one, so dropout (and the result) differs from an uninterrupted run."
        )
    if trainer.global_rank < len(states):
        set_rng_state(states[trainer.global_rank])
