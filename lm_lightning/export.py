"""Export of a trained network: int8 / int4 / float32 weights in safetensors, stored sparsely where that is smaller.

    folder/model.safetensors   integer codes + scales (quantized matrices), float32 for the rest; no pickle
    folder/manifest.json       format version, network class and settings, bits, per-tensor formats, ties, file hashes
    folder/vocab.json          the vocabulary, when given

Any network works: its state dict is exported as it is, a tensor shared by two names (a tied embedding/decoder) is
stored once, and with ``bits`` every floating 2-D tensor (embedding, LSTM/GRU and decoder matrices) is quantized by
the rule of ``quantization.py``. The network must be a plain one: a copy with pruning made permanent and fake
quantization off (``callbacks/export.py`` makes that copy), so this file knows nothing of either strategy.

What this adds to safetensors/torchao: sparse storage (symmetric quantization maps 0 to 0, so pruned zeros stay
zero; a tensor is stored as a bit mask or a list of indices plus its non-zero values whenever that is smaller,
index bytes counted), tied weights stored once, an atomic folder write, and a checked loader that rebuilds the
template's own networks from the manifest, and a fork's network into an instance the caller gives it: no code named
inside an export file is ever imported. The format's names and layouts are in ``export_format.py``; what the loader
checks before it reads a weight is in ``export_checks.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from lm_lightning.errors import LMInputError
from lm_lightning.export_checks import (
    MAX_ELEMENTS,
    check_files,
    check_header,
    meta_network,
    one_line,
    read_manifest,
    tensor_plans,
)
from lm_lightning.export_format import (
    FORMAT,
    MANIFEST,
    VERSION,
    VOCAB,
    WEIGHTS,
    NotAnExport,
    decode_values,
    header_of,
    layouts,
    network_tensors,
    stored_as,
    stored_bytes,
)
from lm_lightning.export_format import sha256 as _sha256
from lm_lightning.inference import IntegerMatrix, integer_modules
from lm_lightning.io import atomic_directory, atomic_path
from lm_lightning.networks import NETWORKS
from lm_lightning.quantization import block_width, check_quantization, dequantize_weight, quantize_weight

if TYPE_CHECKING:
    from lm_lightning.data import Vocabulary

__all__ = ["MAX_ELEMENTS", "export_model", "load_exported", "network_tensors", "record_evaluation"]


# --- export ----------------------------------------------------------------------------------------------
def export_model(
    network: nn.Module,
    folder: str | Path,
    bits: int | None = None,
    group_size: int = 32,
    vocab: Vocabulary | None = None,
    metadata: dict | None = None,
) -> dict:
    """Write folder/model.safetensors + folder/manifest.json (+ folder/vocab.json when vocab is given), atomically:
    a crash never leaves a half-written export and a re-export replaces the old one only when complete.
    bits=None keeps float32 values (still stored sparsely where that is smaller); 8 = int8 per output channel; 4 = int4
    groups of group_size along the input dimension, packed two per byte. Returns a report dict that includes at least
    {"bytes": total size of the folder's files, "tensors": {name: {"format": ..., "bytes": ...}}}."""
    check_quantization(bits, group_size)
    folder = Path(folder)
    if folder.exists() and not (folder / MANIFEST).is_file() and (not folder.is_dir() or any(folder.iterdir())):
        raise LMInputError(f"{folder} exists and is not an export: choose an empty or new folder for the export.")
    tensors, ties = network_tensors(network)
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    for name, tensor in tensors.items():
        quantized, dtype = stored_as(tensor, bits)
        info: dict[str, Any] = {"shape": list(tensor.shape), "dtype": dtype, "quantized": quantized}
        if quantized:
            info["block"] = block_width(tensor.shape, bits, group_size, name)
            # Quantized where the network lives, as fake quantization was: a GPU's reciprocal can round differently.
            codes, scale = (t.cpu() for t in quantize_weight(tensor.float(), bits, group_size))
            values = codes.numpy()
            arrays[f"{name}.scale"] = scale.numpy()
        else:
            values = (tensor.float() if tensor.is_floating_point() else tensor).cpu().numpy()
        storage, chosen = min(layouts(values, dtype == "int4"), key=lambda c: stored_bytes(c[1]))
        info.update(storage=storage, nnz=int(np.count_nonzero(values)))
        arrays.update({name + suffix: np.ascontiguousarray(a) for suffix, a in chosen.items()})
        info["bytes"] = sum(a.nbytes for k, a in arrays.items() if k == name or k.startswith(name + "."))
        entries[name] = info

    spec = {"class": type(network).__name__, "config": getattr(network, "config", None)}
    with atomic_directory(folder, replace=True) as tmp:
        with atomic_path(tmp / WEIGHTS) as weights:  # safetensors alone would leave the file 0600 whatever the umask
            save_file(arrays, str(weights), metadata={"format": FORMAT})
        if vocab is not None:
            vocab.save(tmp / VOCAB)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "bits": bits,
            "group_size": group_size,
            "network": spec,
            "tensors": entries,
            "ties": ties,
            "files": files,
            "metadata": metadata or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
    formats = {
        n: {"format": e["dtype"] if e["storage"] == "dense" else f"{e['dtype']}+{e['storage']}", "bytes": e["bytes"]}
        for n, e in entries.items()
    }
    return {
        "folder": str(folder),
        "bits": bits,
        "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "float32_bytes": 4 * sum(math.prod(e["shape"]) for e in entries.values()),
        "tensors": formats,
    }


def record_evaluation(folder: str | Path, figures: dict) -> None:
    """Add what the export measured on itself (its test perplexity) to its manifest's metadata, atomically. The
    manifest is not among the hashed files, so the weights' checks are unchanged."""
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.setdefault("metadata", {}).setdefault("evaluation", {}).update(figures)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")


# --- loading ---------------------------------------------------------------------------------------------
def load_exported(
    folder: str | Path, network: Optional[nn.Module] = None, max_elements: int = MAX_ELEMENTS, dequantize: bool = False
) -> nn.Module:
    """The exported network, runnable, in eval mode, tied as exported.

    An int8/int4 export keeps its weights as integer codes in memory: its embeddings, linear layers and LSTMs are
    replaced by the integer modules of ``inference.py``, which never build a float copy of a weight (a fork's other
    modules get dequantized float weights). ``dequantize=True`` loads float32 weights instead (``dequantize(codes)``,
    the weights QAT trained), into the network's own modules.

    The template's networks (``models.NETWORKS``) are rebuilt from the manifest; any other network (a fork's) is
    loaded into ``network``, an instance built with the same settings.

    An export folder is untrusted input: the whole manifest is checked against the network it describes (built on
    the ``meta`` device, which allocates nothing) and against the safetensors header before any weight is read,
    a network of more than ``max_elements`` numbers is refused before it is built, and every failure is one
    ``LMInputError`` naming the folder.
    """
    folder = Path(folder)
    try:
        return _load(folder, network, max_elements, dequantize)
    except NotAnExport as why:
        raise LMInputError(f"{folder} is not a readable lm_lightning export: {why}; export the model again.") from None
    except OSError as err:  # a file that cannot be opened (permissions) or vanished while it was read
        name = Path(err.filename).name if err.filename else "a file"
        raise LMInputError(
            f"{folder} is not a readable lm_lightning export: {name} cannot be read ({err.strerror}); "
            "check its permissions or export the model again."
        ) from None


def _load(folder: Path, network: Optional[nn.Module], max_elements: int, dequantize: bool) -> nn.Module:
    manifest = read_manifest(folder)
    check_files(folder, manifest["files"])
    template = network if network is not None else meta_network(folder, manifest, max_elements)
    try:
        tensors, ties = network_tensors(template)
    except LMInputError as err:  # a caller's instance still under pruning
        raise NotAnExport(f"the network passed in cannot take it ({err})") from None
    plans = tensor_plans(manifest, tensors, ties, type(template).__name__)
    check_header(folder / WEIGHTS, header_of(plans))
    for name in manifest["files"]:  # the names and sizes were checked above: now the content
        if _sha256(folder / name) != manifest["files"][name]["sha256"]:
            raise NotAnExport(f"{name} does not match the manifest (size or SHA-256 differ)")
    try:
        arrays = load_file(str(folder / WEIGHTS))
    except Exception as err:  # SafetensorError, OSError: the file changed under us
        raise NotAnExport(f"{WEIGHTS} cannot be read ({one_line(err)})") from None
    state, matrices = {}, {}
    for name, info in plans.items():
        if info["dtype"] == "int4" and info["storage"] == "dense" and info["shape"][-1] % 2 == 0 and not dequantize:
            # Stored packed row by row already (an even width starts every row on a byte): resident as it is.
            rows, width = info["shape"]  # int4 is only ever a quantized matrix
            packed = torch.from_numpy(arrays[name]).reshape(rows, width // 2)
            matrices[name] = IntegerMatrix(packed, torch.from_numpy(arrays[f"{name}.scale"]), 4, width=width)
            continue
        values = decode_values(arrays, info, name)
        if info["quantized"]:
            codes = torch.from_numpy(values.astype(np.int8)).reshape(info["shape"])
            scale = torch.from_numpy(arrays[f"{name}.scale"])
            if dequantize:
                state[name] = dequantize_weight(codes, scale)
            else:
                matrices[name] = IntegerMatrix(codes, scale, int(info["dtype"].removeprefix("int")))
        else:
            state[name] = torch.from_numpy(values.astype(info["dtype"])).reshape(info["shape"])
    if matrices:
        return _integer_network(network if network is not None else template, matrices, state, ties)
    for alias, name in ties.items():
        state[alias] = state[name]
    if network is None:
        network = NETWORKS[manifest["network"]["class"]](**manifest["network"]["config"], dropout=0.0)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:  # a caller's instance whose parameters changed since the check: not expected
        raise NotAnExport(f"a tensor does not fit the network ({one_line(err)})") from None
    return network.eval()


def _integer_network(network: nn.Module, matrices: dict, state: dict, ties: dict[str, str]) -> nn.Module:
    """``network`` (the template's, built on the meta device, or the caller's instance) with integer modules in place
    of its quantized ones and the other tensors assigned from the export."""
    taken = integer_modules(network, matrices, state, ties)
    for name, matrix in matrices.items():  # a fork's module the integer modules do not cover: float, as before
        if name not in taken:
            state[name] = matrix.dequantize()
    state = {n: t for n, t in state.items() if n not in taken}
    state.update({alias: state[name] for alias, name in ties.items() if alias not in taken and name in state})
    try:
        network.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        raise NotAnExport(f"a tensor does not fit the network ({one_line(err)})") from None
    missing = [n for n, t in [*network.named_parameters(), *network.named_buffers()] if t.is_meta]
    if missing:
        raise NotAnExport(f"it holds no values for {missing[0]}")
    return network.eval()
