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
inside an export file is ever imported.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from lm_lightning.errors import LMInputError
from lm_lightning.io import atomic_directory
from lm_lightning.models import NETWORKS
from lm_lightning.quantization import block_width, check_quantization, dequantize_weight, quantize_weight

if TYPE_CHECKING:
    from lm_lightning.data import Vocabulary

FORMAT, VERSION = "lm_lightning.export", 2
WEIGHTS, MANIFEST, VOCAB = "model.safetensors", "manifest.json", "vocab.json"
ENTRY_OVERHEAD = 64  # ~bytes one more array adds to the safetensors JSON header (dtype, shape, offsets)


# --- storage: int4 packing and sparse layouts --------------------------------------------------------------
def _pack_int4(codes: np.ndarray) -> np.ndarray:
    nibbles = (codes.astype(np.uint8) & 0xF).ravel()
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=1).ravel()[:count]
    return (nibbles.astype(np.int8) ^ 8) - 8  # sign-extend 4-bit two's complement


def _layouts(values: np.ndarray, int4: bool) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Dense, bit mask + non-zeros, and indices + non-zeros; the caller keeps the smallest."""
    encode = _pack_int4 if int4 else (lambda v: v)
    flat = values.ravel()
    nonzero = flat != 0
    candidates = [("dense", {"": encode(flat) if int4 else values})]
    kept = encode(flat[nonzero])
    candidates.append(("bitmask", {".mask": np.packbits(nonzero), ".values": kept}))
    index_dtype = np.uint16 if flat.size <= 2**16 else np.uint32
    candidates.append(("coo", {".index": np.flatnonzero(nonzero).astype(index_dtype), ".values": kept}))
    return candidates


def _stored_bytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes + ENTRY_OVERHEAD for a in arrays.values())


def _decode_values(arrays: dict[str, np.ndarray], info: dict, name: str) -> np.ndarray:
    numel, int4 = math.prod(info["shape"]), info["dtype"] == "int4"
    if info["storage"] == "dense":
        flat = arrays[name].ravel()
        return _unpack_int4(flat, numel) if int4 else flat
    values = arrays[f"{name}.values"]
    values = _unpack_int4(values, info["nnz"]) if int4 else values
    out = np.zeros(numel, dtype=np.int8 if int4 else values.dtype)
    if info["storage"] == "bitmask":
        out[np.unpackbits(arrays[f"{name}.mask"], count=numel).astype(bool)] = values
    else:
        out[arrays[f"{name}.index"].astype(np.int64)] = values
    return out


# --- export ----------------------------------------------------------------------------------------------
def network_tensors(network: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The network's state as ``(tensors, ties)``: each distinct tensor once, under its first name, and the other
    names of a shared tensor (``{"decoder.weight": "embedding.weight"}`` when tied)."""
    tensors: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in network.state_dict(keep_vars=True).items():
        if name.endswith(("_orig", "_mask")):
            raise LMInputError(
                f"{type(network).__name__} still holds pruning masks ({name}): export a copy with pruning made permanent "
                "(lm_lightning.callbacks.export.plain_copy)."
            )
        if id(tensor) in first:
            ties[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
            tensors[name] = tensor.detach()
    return tensors, ties


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
        quantized = bits is not None and tensor.is_floating_point() and tensor.dim() == 2
        dtype = (
            f"int{bits}" if quantized else ("float32" if tensor.is_floating_point() else str(tensor.dtype).removeprefix("torch."))
        )
        info: dict[str, Any] = {"shape": list(tensor.shape), "dtype": dtype, "quantized": quantized}
        if quantized:
            info["block"] = block_width(tensor.shape, bits, group_size, name)
            # Quantized where the network lives, as fake quantization was: a GPU's reciprocal can round differently.
            codes, scale = (t.cpu() for t in quantize_weight(tensor.float(), bits, group_size))
            values = codes.numpy()
            arrays[f"{name}.scale"] = scale.numpy()
        else:
            values = (tensor.float() if tensor.is_floating_point() else tensor).cpu().numpy()
        storage, chosen = min(_layouts(values, dtype == "int4"), key=lambda c: _stored_bytes(c[1]))
        info.update(storage=storage, nnz=int(np.count_nonzero(values)))
        arrays.update({name + suffix: np.ascontiguousarray(a) for suffix, a in chosen.items()})
        info["bytes"] = sum(a.nbytes for k, a in arrays.items() if k == name or k.startswith(name + "."))
        entries[name] = info

    spec = {"class": type(network).__name__, "config": getattr(network, "config", None)}
    with atomic_directory(folder, replace=True) as tmp:
        save_file(arrays, str(tmp / WEIGHTS), metadata={"format": FORMAT})
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- loading ---------------------------------------------------------------------------------------------
def load_exported(folder: str | Path, network: Optional[nn.Module] = None) -> nn.Module:
    """The exported network, runnable, in eval mode, with float32 weights (dequantized) and tied as exported.

    The template's networks (``models.NETWORKS``) are rebuilt from the manifest; any other network (a fork's) is
    loaded into ``network``, an instance built with the same settings.
    """
    folder = Path(folder)

    def bad(why: str) -> LMInputError:
        return LMInputError(f"{folder} is not a readable lm_lightning export: {why}; export the model again.")

    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad(f"{MANIFEST} is missing") from None
    except (OSError, ValueError) as err:
        raise bad(f"{MANIFEST} cannot be read ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else None
        raise bad(f"its manifest is {found}, this version reads ({FORMAT!r}, {VERSION})")
    try:
        for name, expected in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                raise bad(f"{name} is missing")
            if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
                raise bad(f"{name} does not match the manifest (size or SHA-256 differ)")
        if network is None:
            network = _build_network(folder, manifest["network"])
        arrays = load_file(str(folder / WEIGHTS))
        state = {}
        for name, info in manifest["tensors"].items():
            values = _decode_values(arrays, info, name)
            if info["quantized"]:
                codes = torch.from_numpy(values.astype(np.int8)).reshape(info["shape"])
                state[name] = dequantize_weight(codes, torch.from_numpy(arrays[f"{name}.scale"]))
            else:
                state[name] = torch.from_numpy(values.astype(info["dtype"])).reshape(info["shape"])
        for alias, name in manifest["ties"].items():
            state[alias] = state[name]
    except LMInputError as err:
        if str(err).startswith(f"{folder} "):
            raise
        raise bad(f"its network settings are invalid ({err})") from None
    except (KeyError, ValueError, TypeError, RuntimeError, OSError) as err:
        raise bad(f"its content does not match the manifest ({type(err).__name__}: {err})") from None
    needed = set(network.state_dict())
    if set(state) != needed:
        raise bad(f"it stores {sorted(state)}, the {type(network).__name__} needs {sorted(needed)}")
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err)]
        raise bad(f"a tensor has the wrong shape ({details[0]})") from None
    return network.eval()


def _build_network(folder: Path, spec: dict) -> nn.Module:
    """One of the template's networks from the manifest's class name and settings (a fixed table, no import)."""
    cls, config = NETWORKS.get(spec["class"]), spec.get("config")
    if cls is None or not isinstance(config, dict):
        raise LMInputError(
            f"{folder} holds a {spec['class']} network, which load_exported cannot build from the manifest: "
            f"pass network=<a {spec['class']} built with the same settings>."
        )
    return cls(**config, dropout=0.0)
