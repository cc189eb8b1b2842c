"""What a run would find out only after Lightning created its run folder, checked before it does (issue 8).

Lightning makes ``lightning_logs/version_N`` as a run starts, before it builds the optimizer: an invalid learning
rate ended in a traceback from torch and a stray run folder, a folder that cannot be written in a traceback from
TensorBoard, and ``--trainer.max_epochs 0`` in a "finished" run that trained nothing. :func:`check_start` says each in
one sentence first. For bad input found later (a callback's ``setup``), :func:`new_folders` and
:func:`remove_failed_start` take away the folder of a start that failed before its first step.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from lm_lightning.errors import LMInputError
from lm_lightning.io import disk_full

SAVE_DIR_FLAG = "--trainer.logger.init_args.save_dir"
PROBE_BYTES = 1 << 20
log = logging.getLogger(__name__)


def check_start(
    trainer: L.Trainer, model: L.LightningModule, subcommand: str, resumed: Optional[tuple[str, list[dict]]] = None
) -> None:
    """One sentence, before anything is written, for settings Lightning or torch would refuse (or ignore) later.
    ``resumed``: the ``--ckpt_path`` a fit resumes and its saved optimizer states."""
    log_dir = trainer.log_dir
    # The root first: the logs go under it unless the logger names its own folder, and its flag is the one to fix.
    if Path(trainer.default_root_dir).absolute() != Path.cwd():
        check_writable(Path(trainer.default_root_dir), "give --trainer.default_root_dir a writable folder")
    if log_dir is not None:
        check_writable(Path(log_dir), f"run from a writable folder or set {SAVE_DIR_FLAG} to one")
    if subcommand == "fit":
        check_training_budget(trainer)
        check_optimizer(model, resumed)
        check_sparse_all_reduce(trainer, model)


def check_writable(folder: Path, fix: str) -> None:
    """``folder`` exists and takes a new file, or can be created: tried with a temporary file, as access() and
    permission bits say nothing for root or a read-only file system."""
    folder = folder.absolute()
    existing = folder
    while not os.path.exists(existing):  # not Path.exists(), which raises under a folder we may not list
        existing = existing.parent
    if not os.path.isdir(existing):
        raise LMInputError(f"The folder {folder} cannot be created because {existing} is a file, not a folder: {fix}.")
    try:
        # 1 MiB written for real: a full disk accepts an empty file, then fails in TensorBoard's writer thread.
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        if disk_full(err):
            raise LMInputError(f"The disk holding {folder} is full (not even 1 MiB could be written): free space there, or {fix}.") from None
        raise LMInputError(f"The folder {folder} cannot be written ({existing}: {err.strerror}): {fix}.") from None


def check_training_budget(trainer: L.Trainer) -> None:
    """Lightning accepts a run that trains nothing, ends "successfully" and leaves a run folder with an untrained
    checkpoint; -1 (no limit) stays Lightning's to handle."""
    loop = trainer.fit_loop
    for flag, value in (("max_epochs", loop.max_epochs), ("max_steps", loop.max_steps), ("limit_train_batches", trainer.limit_train_batches)):
        if value == 0:
            raise LMInputError(
                f"--trainer.{flag} 0 trains nothing: give a positive value (-1 means no limit for max_epochs and max_steps), "
                "or use `validate` to only evaluate."
            )


def process_group_backend(trainer: L.Trainer) -> Optional[str]:
    """The backend the strategy's processes will all-reduce gradients with (None for one process without one):
    the one given, else Lightning's default for the device, nccl on CUDA and gloo elsewhere."""
    strategy = trainer.strategy
    if not hasattr(strategy, "process_group_backend"):  # DDP, DDP spawn/fork/notebook, FSDP have one
        return None
    return strategy.process_group_backend or ("nccl" if strategy.root_device.type == "cuda" else "gloo")


def check_sparse_all_reduce(trainer: L.Trainer, model: L.LightningModule) -> None:
    """NCCL has no all-reduce for sparse tensors: DDP on GPUs would fail at the first backward pass, after every rank
    has started, with a traceback per rank. Sparse gradients come from a callback that says it makes them
    (``callbacks/sparse_gradients.py``) or from an embedding built with ``sparse=True``. Gloo (CPU DDP) all-reduces them."""
    sparse = any(getattr(c, "makes_sparse_gradients", False) for c in trainer.callbacks) or any(
        getattr(m, "sparse", False) is True for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
    )
    backend = process_group_backend(trainer) if sparse else None
    if backend is not None and "nccl" in backend:
        raise LMInputError(
            f"Sparse embedding gradients cannot train under --trainer.strategy {getattr(trainer.strategy, 'strategy_name', 'ddp')} on GPUs: "
            f"its process group ({backend}) has no all-reduce for sparse tensors, so leave SparseEmbeddingGradients out "
            "of a multi-GPU run (the gradients are then dense), or train on CPU processes (--trainer.accelerator cpu, gloo)."
        )


def check_optimizer(model: L.LightningModule, resumed: Optional[tuple[str, list[dict]]] = None) -> None:
    """Build the optimizer (and schedule) once, as fit will: torch refuses a negative learning rate only then, and
    accepts a zero one, which trains nothing. When resuming, the optimizer must be the one whose state is saved."""
    try:
        configured = model.configure_optimizers()
    except ValueError as err:
        lr = re.search(r"Invalid learning rate: (\S+)", str(err))
        if lr:
            raise LMInputError(_lr_sentence(lr.group(1))) from None
        raise LMInputError(f"--model.optimizer was refused by torch ({err}): fix the value it names.") from None
    except Exception:  # e.g. a fork's configure_optimizers that needs the trainer: fit will tell
        return
    for optimizer in _optimizers(configured):
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if lr is not None and float(lr) <= 0:
                raise LMInputError(_lr_sentence(float(lr)))
    if resumed is not None:
        path, states = resumed
        for optimizer, state in zip(_optimizers(configured), states):
            check_resumed_optimizer(optimizer, state, path)


# Settings torch fills in itself when it loads a state saved without them (by an older torch): not the optimizer's own.
_TORCH_FLAGS = {"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay", "initial_lr"}


def check_resumed_optimizer(optimizer: torch.optim.Optimizer, state: dict, path: str) -> None:
    """Resuming loads the saved optimizer state into the configured optimizer, settings included: another optimizer
    class then fails in its first step (AdamW's state has no ``momentum`` for SGD), and a new learning rate is replaced
    by the saved one. The first is refused, the second said."""
    groups = state.get("param_groups") or [{}]
    saved = groups[0]
    missing = sorted(set(optimizer.defaults) - set(saved) - _TORCH_FLAGS)
    if missing:
        raise LMInputError(
            f"--model.optimizer {type(optimizer).__name__} is not the optimizer {path} was trained with (its saved state "
            f"has no {', '.join(missing)}): resume with the run's own optimizer settings (its config.yaml), or start a "
            f"new run from these weights with a new optimizer: --weights_from {path} instead of --ckpt_path."
        )
    given, kept = optimizer.param_groups[0].get("lr"), saved.get("initial_lr", saved.get("lr"))
    if isinstance(given, (int, float)) and isinstance(kept, (int, float)) and not math.isclose(given, kept, rel_tol=1e-9):
        log.warning(
            "--model.optimizer.lr %g is not used when resuming: the learning rate (and its schedule) continue from %s "
            "(lr %g). To train on at another rate, start from its weights with --weights_from.", given, path, kept
        )


def _lr_sentence(lr: Any) -> str:
    return f"--model.optimizer.lr must be positive, got {lr}: give a learning rate such as 3e-3 (AdamW) or 20 (SGD)."


def _optimizers(configured: Any) -> list[torch.optim.Optimizer]:
    """The optimizers in anything ``configure_optimizers`` may return (one, a dict, a list or tuple of them)."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    if isinstance(configured, dict):
        return _optimizers(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)):
        return [o for item in configured for o in _optimizers(item)]
    return []


def new_folders(trainer: L.Trainer) -> Optional[Path]:
    """The outermost folder of the run folder that does not exist yet (``lightning_logs`` on a first run)."""
    log_dir = trainer.log_dir
    if log_dir is None or not trainer.is_global_zero:
        return None
    folder = Path(log_dir).absolute()
    if os.path.exists(folder):
        return None
    while not os.path.exists(folder.parent):
        folder = folder.parent
    return folder


def remove_failed_start(trainer: L.Trainer, created: Optional[Path]) -> None:
    """Remove what a failed start created, if it never took a step nor wrote a checkpoint (nothing worth keeping)."""
    if created is not None and created.is_dir() and trainer.global_step == 0 and not any(created.rglob("*.ckpt")):
        shutil.rmtree(created, ignore_errors=True)
