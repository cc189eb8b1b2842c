"""Loading an export: a checked folder back into a runnable float32 network, its int8/int4 codes dequantized.

``checks.py`` holds what is checked before a weight is read, ``rebuild.py`` how the manifest's network is built.
Deployment runs an export elsewhere (ONNX Runtime); this is the PyTorch side: an export back as a plain network, to
finish or fine-tune it, or to ``generate`` and ``score`` through torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import nn

from lm_lightning.deploy.layout import GOOD_CHECKPOINT, sealed_manifest
from lm_lightning.errors import LMInputError
from lm_lightning.export.checks import MAX_ELEMENTS, check_files, check_header, one_line, read_manifest, tensor_plans
from lm_lightning.export.format import MANIFEST, WEIGHTS, NotAnExport, decode_values, header_of, network_tensors
from lm_lightning.export.format import sha256 as _sha256
from lm_lightning.export.quantization import dequantize_weight
from lm_lightning.export.rebuild import build_network, from_registry, meta_network, network_class
from lm_lightning.io import atomic_path

__all__ = ["MAX_ELEMENTS", "load_exported", "record_evaluation"]


def load_exported(folder: str | Path, network: Optional[nn.Module] = None, max_elements: int = MAX_ELEMENTS) -> nn.Module:
    """The exported network, runnable, in eval mode, tied as exported, with float32 weights in its own modules.

    An int8/int4 export's codes are dequantized (``codes x scales``, ``quantization.dequantize_weight``): the very
    weights QAT trained with, so the loaded network computes what the fake-quantized one did.

    The network is rebuilt from the manifest: the template's (``networks.NETWORKS``) from a fixed table, any other
    from its recorded class path and constructor arguments (``rebuild.py`` says what that trusts). ``network``, an
    instance built with the same settings, is loaded instead when given.

    An export folder is untrusted input: the whole manifest is checked against the network it describes (built on
    the ``meta`` device, which allocates nothing) and against the safetensors header before any weight is read,
    a network of more than ``max_elements`` numbers is refused before it is built, and every failure is one
    ``LMInputError`` naming the folder.
    """
    folder = Path(folder)
    try:
        return _load(folder, network, max_elements)
    except NotAnExport as why:
        raise LMInputError(f"{folder} is not a readable lm_lightning export: {why}; {why.fix}.") from None
    except OSError as err:  # a file that cannot be opened (permissions) or vanished while it was read
        name = Path(err.filename).name if err.filename else "a file"
        raise LMInputError(
            f"{folder} is not a readable lm_lightning export: {name} cannot be read ({err.strerror}); "
            "check its permissions or export the model again."
        ) from None


def _load(folder: Path, network: Optional[nn.Module], max_elements: int) -> nn.Module:
    manifest = read_manifest(folder)
    check_files(folder, manifest["files"])
    hashed = network is None and not from_registry(manifest["network"])
    if hashed:  # a class path is imported only for files that match their hashes (see rebuild.network_class)
        _check_hashes(folder, manifest["files"])
    template = network if network is not None else meta_network(folder, manifest, max_elements)
    try:
        tensors, ties = network_tensors(template)
    except LMInputError as err:  # a caller's instance still under pruning
        raise NotAnExport(f"the network passed in cannot take it ({err})") from None
    plans = tensor_plans(manifest, tensors, ties, type(template).__name__)
    check_header(folder / WEIGHTS, header_of(plans))
    if not hashed:  # the names and sizes were checked above: now the content
        _check_hashes(folder, manifest["files"])
    try:
        arrays = load_file(str(folder / WEIGHTS))
    except Exception as err:  # SafetensorError, OSError: the file changed under us
        raise NotAnExport(f"{WEIGHTS} cannot be read ({one_line(err)})") from None
    for name, array in arrays.items():  # the scales of integer weights and the float32 ones; codes are always finite
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise NotAnExport(f"{WEIGHTS} holds NaN or infinite values (in {name})", GOOD_CHECKPOINT)
    state = {}
    for name, info in plans.items():
        values = decode_values(arrays, info, name)
        if info["quantized"]:
            codes = torch.from_numpy(values.astype(np.int8)).reshape(info["shape"])
            state[name] = dequantize_weight(codes, torch.from_numpy(arrays[f"{name}.scale"]))
        else:
            state[name] = torch.from_numpy(values.astype(info["dtype"])).reshape(info["shape"])
    for alias, name in ties.items():
        state[alias] = state[name]
    if network is None:
        spec = manifest["network"]
        network = build_network(network_class(folder, spec), spec["config"], spec.get("modules"), folder)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:  # a caller's instance whose parameters changed since the check: not expected
        raise NotAnExport(f"a tensor does not fit the network ({one_line(err)})") from None
    return network.eval()


def _check_hashes(folder: Path, files: dict) -> None:
    for name in files:
        if _sha256(folder / name) != files[name]["sha256"]:
            raise NotAnExport(f"{name} does not match the manifest (size or SHA-256 differ)")


def record_evaluation(folder: str | Path, figures: dict) -> None:
    """Add what the export measured on itself (its test perplexity) to its manifest's metadata, atomically, sealed
    anew (the manifest is not among the files it hashes, so the other files' checks are unchanged)."""
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.setdefault("metadata", {}).setdefault("evaluation", {}).update(figures)
    with atomic_path(path) as tmp:
        tmp.write_text(sealed_manifest(manifest), encoding="utf-8")
