"""A ``--ckpt_path`` (or ``--weights_from``) checked and read before any run folder exists.

What Lightning (2.6) lacks and this module adds:

* :func:`load_checkpoint_file` and :func:`check_compatible`: a missing, folder, unreadable, truncated or foreign
  ``--ckpt_path`` is one :class:`LMInputError`, raised before any run folder exists.
* :func:`keep_command_line_settings`: with ``--ckpt_path``, LightningCLI replaces every ``--model.*`` value by the
  checkpoint's hyper-parameters; the architecture must come from the checkpoint, but how to generate text (and to
  compute the loss) is the caller's choice.

Writing checkpoints (atomically, ``last.ckpt`` every epoch, the RNG state per rank) is ``checkpoints.py``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lm_lightning.errors import LMInputError

log = logging.getLogger(__name__)

# --model.* settings that say how to generate text or compute the loss, not what the network is: with --ckpt_path they
# come from the command line (and config files), everything else from the checkpoint.
COMMAND_LINE_SETTINGS = (
    "sample_length", "max_new_tokens", "temperature", "top_k", "seed", "predict_words"
)  # fmt: skip

# Values of --ckpt_path that Lightning resolves itself (fit: "last" in the checkpoint folder).
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


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
    hparams = checkpoint.get("hyper_parameters") or {}
    if flag == "--ckpt_path" and "network" not in hparams and "embedding_dim" in hparams:
        sizes = ", ".join(f"{k} {hparams[k]}" for k in ("embedding_dim", "hidden_dim", "num_layers", "tie_weights") if k in hparams)
        raise LMInputError(
            f"{flag} {path} was written before the network became an argument of the model (its {sizes} are the model's "
            "own settings there): start a new fit from its weights with --weights_from and the same sizes as "
            "--model.network.* flags."
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
def keep_command_line_settings(before: Any, after: Any, prefix: str = "--model.") -> None:
    """After LightningCLI put the checkpoint's hyper-parameters into the model config (``after``), give back the
    generation settings of the command line (``before``), and warn about architecture flags that lose (the injected
    network's too, ``--model.network.*``)."""
    if before is None or after is None or getattr(before, "init_args", None) is None or getattr(after, "init_args", None) is None:
        return
    given, stored = before.init_args, after.init_args
    defaults = _init_defaults(getattr(before, "class_path", None))
    for key in vars(given):
        if key in COMMAND_LINE_SETTINGS:  # also into a checkpoint older than the setting
            stored[key] = given[key]
        elif key in ("vocab_size", "optimizer", "lr_scheduler") or key not in stored:
            continue
        elif getattr(given[key], "init_args", None) is not None:  # a submodule given by class path: the network
            keep_command_line_settings(given[key], stored[key], f"{prefix}{key}.")
        elif given[key] != stored[key] and key in defaults and given[key] != defaults[key]:
            log.warning(
                "%s%s %s is ignored: the architecture comes from the checkpoint (%s=%s).", prefix, key, given[key], key, stored[key]
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
