"""Checkpoints that survive kills and full disks, resume bit for bit, and refuse the wrong file in one sentence.

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
* :func:`load_checkpoint_file` and :func:`check_compatible`: a missing, folder, unreadable, truncated or foreign
  ``--ckpt_path`` is one :class:`LMInputError`, raised before any run folder exists.
* :func:`keep_command_line_settings`: with ``--ckpt_path``, LightningCLI replaces every ``--model.*`` value by the
  checkpoint's hyper-parameters; the architecture must come from the checkpoint, but how to generate text (and to
  compute the loss) is the caller's choice.
"""

from __future__ import annotations

import errno
import importlib
import inspect
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
from torch import nn

from lm_lightning.errors import LMInputError

log = logging.getLogger(__name__)

# Written as ".<target name>.<pid>.<random>.tmp" next to the target: hidden, and the pid tells a leftover of a killed
# run (its process is gone) from the save in progress of a live one.
TMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")

# --model.* settings that say how to generate text or compute the loss, not what the network is: with --ckpt_path they
# come from the command line (and config files), everything else from the checkpoint.
COMMAND_LINE_SETTINGS = (
    "sample_length", "max_new_tokens", "temperature", "top_k", "seed", "predict_words", "loss_chunk_size", "recompute_segments"
)  # fmt: skip

# Values of --ckpt_path that Lightning resolves itself (fit: "last" in the checkpoint folder).
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


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
        except OSError as err:
            raise _write_error(target.parent, err) from None
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_folder(target.parent)


def _write_error(folder: Path, err: OSError) -> Exception:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return LMInputError(
            f"The disk holding {folder} is full, so the checkpoint was not written (the previous one is kept): free "
            "space there or point --trainer.default_root_dir to another disk."
        )
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
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


# --- reading a --ckpt_path ----------------------------------------------------------------------------------
def is_checked_path(path: Any) -> bool:
    """Whether ``path`` is a local file name to check (not a keyword Lightning resolves, not a URL)."""
    return isinstance(path, (str, Path)) and str(path) not in LIGHTNING_CKPT_KEYWORDS and "://" not in str(path)


def load_checkpoint_file(path: str | Path, flag: str = "--ckpt_path", resume: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` (on the CPU), or one :class:`LMInputError` saying why it is not one (or, with
    ``resume``, why fit cannot continue from it)."""
    path = Path(path)
    where = "e.g. RUN/checkpoints/last.ckpt"
    if not path.exists():
        raise LMInputError(f"{flag} {path} is not a file (it does not exist): give a checkpoint written by fit, {where}.")
    if path.is_dir():
        inside = next((p for p in (path / "last.ckpt", path / "checkpoints" / "last.ckpt") if p.is_file()), None)
        hint = f"e.g. {inside}" if inside else where
        raise LMInputError(f"{flag} {path} is not a file (it is a folder): give a checkpoint file, {hint}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise LMInputError(f"{flag} {path} is not readable (permission denied): fix its permissions or copy it.") from None
    except Exception as err:  # random bytes, a truncated zip, another format: whatever torch raises
        raise LMInputError(
            f"{flag} {path} cannot be loaded into this run's model: it is not a complete checkpoint ({type(err).__name__}; "
            "truncated or another format), give a .ckpt written by fit."
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise LMInputError(
            f"{flag} {path} cannot be loaded into this run's model: it holds no Lightning state_dict, give a .ckpt written by fit."
        )
    if resume and not all(key in checkpoint for key in ("optimizer_states", "loops")):
        raise LMInputError(
            f"{flag} {path} holds the weights only (--checkpoint.save_weights_only), so fit cannot resume from it: give a "
            "full checkpoint (last.ckpt), or use this one with validate, test, predict or export."
        )
    return checkpoint


def check_compatible(checkpoint: dict[str, Any], model: nn.Module, path: str | Path, flag: str = "--ckpt_path") -> None:
    """Refuse a checkpoint whose weights do not fit ``model`` (another vocabulary, size or network), naming a tensor."""
    stored, expected = checkpoint["state_dict"], model.state_dict()
    fix = "pass -c RUN/config.yaml of the run that wrote it"
    for name, tensor in expected.items():
        if name not in stored:
            raise LMInputError(
                f"{flag} {path} cannot be loaded into this run's model: it has no {name} (another network); {fix}."
            )
        shape = tuple(getattr(stored[name], "shape", ()))
        if shape != tuple(tensor.shape):
            raise LMInputError(
                f"{flag} {path} cannot be loaded into this run's model: {name} is {list(shape)} there and "
                f"{list(tensor.shape)} here (another vocabulary or architecture); {fix}."
            )
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise LMInputError(
            f"{flag} {path} cannot be loaded into this run's model: it has {unexpected[0]}, which this model lacks "
            f"(another network); {fix}."
        )


# --- --model.* flags next to --ckpt_path --------------------------------------------------------------------
def keep_command_line_settings(before: Any, after: Any) -> None:
    """After LightningCLI put the checkpoint's hyper-parameters into the model config (``after``), give back the
    generation settings of the command line (``before``), and warn about architecture flags that lose."""
    if before is None or after is None or getattr(before, "init_args", None) is None or getattr(after, "init_args", None) is None:
        return
    given, stored = before.init_args, after.init_args
    defaults = _init_defaults(getattr(before, "class_path", None))
    for key in vars(given):
        if key in COMMAND_LINE_SETTINGS:  # also into a checkpoint older than the setting
            stored[key] = given[key]
        elif key in ("vocab_size", "optimizer", "lr_scheduler") or key not in stored:
            continue
        elif given[key] != stored[key] and key in defaults and given[key] != defaults[key]:
            log.warning(
                "--model.%s %s is ignored: the architecture comes from the checkpoint (%s=%s).", key, given[key], key, stored[key]
            )


def _init_defaults(class_path: Optional[str]) -> dict[str, Any]:
    if not class_path:
        return {}
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return {}
    return {
        p.name: p.default for p in inspect.signature(cls.__init__).parameters.values() if p.default is not inspect.Parameter.empty
    }
