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
import inspect
import json
import math
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from lm_lightning.errors import LMInputError
from lm_lightning.io import atomic_directory, atomic_path
from lm_lightning.models import NETWORKS
from lm_lightning.quantization import block_width, check_quantization, dequantize_weight, quantize_weight

if TYPE_CHECKING:
    from lm_lightning.data import Vocabulary

FORMAT, VERSION = "lm_lightning.export", 2
WEIGHTS, MANIFEST, VOCAB = "model.safetensors", "manifest.json", "vocab.json"
ENTRY_OVERHEAD = 64  # ~bytes one more array adds to the safetensors JSON header (dtype, shape, offsets)
STORAGES = ("dense", "bitmask", "coo")
# The loader's ceilings: a manifest or header larger than these, or a network of more numbers, is refused unread.
MAX_MANIFEST_BYTES = 16 << 20  # a manifest takes ~300 bytes per tensor
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_ELEMENTS = 1 << 30  # 4 GiB of float32 weights; load_exported(max_elements=...) raises it
SAFETENSORS_DTYPES = {
    "float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}  # fmt: skip
ITEM_BYTES = {code: np.dtype(name).itemsize for name, code in SAFETENSORS_DTYPES.items()}


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
    """The flat values of one stored tensor; sparse positions are checked, so a bad index is refused, not written."""
    numel, int4 = math.prod(info["shape"]), info["dtype"] == "int4"
    if info["storage"] == "dense":
        flat = arrays[name].ravel()
        return _unpack_int4(flat, numel) if int4 else flat
    values = arrays[f"{name}.values"]
    values = _unpack_int4(values, info["nnz"]) if int4 else values
    out = np.zeros(numel, dtype=np.int8 if int4 else values.dtype)
    if info["storage"] == "bitmask":
        mask = np.unpackbits(arrays[f"{name}.mask"]).astype(bool)
        if mask[numel:].any() or np.count_nonzero(mask[:numel]) != info["nnz"]:
            raise _NotAnExport(f"the bit mask of {name} does not mark its {info['nnz']} non-zeros")
        out[mask[:numel]] = values
    else:
        index = arrays[f"{name}.index"].astype(np.int64)
        if index.size and (index[-1] >= numel or np.any(np.diff(index) <= 0)):
            raise _NotAnExport(f"the sparse indices of {name} are not increasing positions below {numel}")
        out[index] = values
    return out


# --- export ----------------------------------------------------------------------------------------------
def _stored_as(tensor: torch.Tensor, bits: Optional[int]) -> tuple[bool, str]:
    """Whether the export quantizes ``tensor`` (every floating matrix, when ``bits`` is set) and the dtype it declares."""
    quantized = bits is not None and tensor.is_floating_point() and tensor.dim() == 2
    if quantized:
        return True, f"int{bits}"
    return False, "float32" if tensor.is_floating_point() else str(tensor.dtype).removeprefix("torch.")


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
        quantized, dtype = _stored_as(tensor, bits)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- loading ---------------------------------------------------------------------------------------------
class _NotAnExport(Exception):
    """Why a folder is not a readable export; ``load_exported`` turns it into one ``LMInputError`` sentence."""


def load_exported(folder: str | Path, network: Optional[nn.Module] = None, max_elements: int = MAX_ELEMENTS) -> nn.Module:
    """The exported network, runnable, in eval mode, with float32 weights (dequantized) and tied as exported.

    The template's networks (``models.NETWORKS``) are rebuilt from the manifest; any other network (a fork's) is
    loaded into ``network``, an instance built with the same settings.

    An export folder is untrusted input: the whole manifest is checked against the network it describes (built on
    the ``meta`` device, which allocates nothing) and against the safetensors header before any weight is read,
    a network of more than ``max_elements`` numbers is refused before it is built, and every failure is one
    ``LMInputError`` naming the folder.
    """
    folder = Path(folder)
    try:
        return _load(folder, network, max_elements)
    except _NotAnExport as why:
        raise LMInputError(f"{folder} is not a readable lm_lightning export: {why}; export the model again.") from None
    except OSError as err:  # a file that cannot be opened (permissions) or vanished while it was read
        name = Path(err.filename).name if err.filename else "a file"
        raise LMInputError(
            f"{folder} is not a readable lm_lightning export: {name} cannot be read ({err.strerror}); "
            "check its permissions or export the model again."
        ) from None


def _load(folder: Path, network: Optional[nn.Module], max_elements: int) -> nn.Module:
    manifest = _read_manifest(folder)
    _check_files(folder, manifest["files"])
    template = network if network is not None else _meta_network(folder, manifest, max_elements)
    try:
        tensors, ties = network_tensors(template)
    except LMInputError as err:  # a caller's instance still under pruning
        raise _NotAnExport(f"the network passed in cannot take it ({err})") from None
    plans = _tensor_plans(manifest, tensors, ties, type(template).__name__)
    _check_header(folder / WEIGHTS, _header_of(plans))
    for name in manifest["files"]:  # the names and sizes were checked above: now the content
        if _sha256(folder / name) != manifest["files"][name]["sha256"]:
            raise _NotAnExport(f"{name} does not match the manifest (size or SHA-256 differ)")
    try:
        arrays = load_file(str(folder / WEIGHTS))
    except Exception as err:  # SafetensorError, OSError: the file changed under us
        raise _NotAnExport(f"{WEIGHTS} cannot be read ({_one_line(err)})") from None
    state = {}
    for name, info in plans.items():
        values = _decode_values(arrays, info, name)
        if info["quantized"]:
            codes = torch.from_numpy(values.astype(np.int8)).reshape(info["shape"])
            state[name] = dequantize_weight(codes, torch.from_numpy(arrays[f"{name}.scale"]))
        else:
            state[name] = torch.from_numpy(values.astype(info["dtype"])).reshape(info["shape"])
    for alias, name in ties.items():
        state[alias] = state[name]
    if network is None:
        network = NETWORKS[manifest["network"]["class"]](**manifest["network"]["config"], dropout=0.0)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:  # a caller's instance whose parameters changed since the check: not expected
        raise _NotAnExport(f"a tensor does not fit the network ({_one_line(err)})") from None
    return network.eval()


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _read_manifest(folder: Path) -> dict:
    """The manifest, its format and version, and the types of what the loader reads from it."""
    path = folder / MANIFEST
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise _NotAnExport(f"{MANIFEST} is missing") from None
    except OSError as err:
        raise _NotAnExport(f"{MANIFEST} cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MANIFEST_BYTES:
        raise _NotAnExport(f"{MANIFEST} is not a regular file of at most {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise _NotAnExport(f"{MANIFEST} cannot be read as JSON ({_one_line(err)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else None
        raise _NotAnExport(f"its manifest is {found}, this version reads ({FORMAT!r}, {VERSION})")
    bits, group_size = manifest.get("bits"), manifest.get("group_size")
    if (
        "bits" not in manifest
        or not (bits is None or (type(bits) is int and bits in (4, 8)))
        or type(group_size) is not int
        or group_size < 1
    ):
        raise _NotAnExport(f"its manifest declares bits {bits!r} and group_size {group_size!r}")
    spec = manifest.get("network")
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise _NotAnExport("its manifest does not name the network's class")
    for key in ("tensors", "ties", "files"):
        if not isinstance(manifest.get(key), dict):
            raise _NotAnExport(f"its manifest's {key!r} is not a JSON object")
    return manifest


def _check_files(folder: Path, files: dict) -> None:
    """Only the files an export writes, each listed with its size and hash, nothing else in the folder.

    Names are compared with a fixed list, so no name can reach outside the folder (``../``, absolute paths, links),
    and a file whose entry was removed from the manifest is refused, not read unchecked.
    """
    for name, entry in files.items():
        if name not in (WEIGHTS, VOCAB):
            kind = (
                "a path, not a file name in the folder"
                if "/" in name or "\\" in name or name in ("", ".", "..")
                else "not a file an export holds"
            )
            raise _NotAnExport(f"its manifest lists {name!r}, {kind} ({WEIGHTS}, {VOCAB})")
        if not isinstance(entry, dict) or type(entry.get("bytes")) is not int or not _is_sha256(entry.get("sha256")):
            raise _NotAnExport(f"its manifest's entry for {name} has no byte count and SHA-256")
    if WEIGHTS not in files:
        raise _NotAnExport(f"its manifest does not list {WEIGHTS}")
    try:
        present = {entry.name for entry in os.scandir(folder)} - {MANIFEST}
    except OSError as err:
        raise _NotAnExport(f"the folder cannot be listed ({err.strerror})") from None
    if present - set(files):
        raise _NotAnExport(
            f"{sorted(present - set(files))[0]} is in the folder but not in the manifest, which must list and hash every file"
        )
    for name, entry in files.items():
        try:
            info = (folder / name).lstat()
        except FileNotFoundError:
            raise _NotAnExport(f"{name} is missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise _NotAnExport(f"{name} is not a regular file")
        if info.st_size != entry["bytes"]:
            raise _NotAnExport(f"{name} does not match the manifest (size or SHA-256 differ)")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _meta_network(folder: Path, manifest: dict, max_elements: int) -> nn.Module:
    """One of the template's networks from the manifest's class name and settings (a fixed table, no import), built
    on the ``meta`` device: its tensor names, shapes and dtypes without a byte of memory for the weights."""
    spec = manifest["network"]
    cls, config = NETWORKS.get(spec["class"]), spec.get("config")
    if cls is None or not isinstance(config, dict):
        raise LMInputError(
            f"{folder} holds a {spec['class']} network, which load_exported cannot build from the manifest: "
            f"pass network=<a {spec['class']} built with the same settings>."
        )
    params = inspect.signature(cls).parameters
    unknown = sorted(set(config) - set(params) | ({"dropout"} & set(config)))
    if unknown:
        raise _NotAnExport(f"its network settings name {unknown}, which the export does not write for a {cls.__name__}")
    for key, value in config.items():
        kind = {"int": int, "bool": bool}.get(getattr(params[key].annotation, "__name__", params[key].annotation))
        if kind is not None and type(value) is not kind:
            raise _NotAnExport(f"its network setting {key} is {value!r}, not {'an integer' if kind is int else 'true or false'}")
    # Building costs a loop per layer even on meta: a manifest cannot ask for more layers than tensors it lists.
    if config.get("num_layers", 1) > len(manifest["tensors"]):
        raise _NotAnExport(f"its network settings ask for {config['num_layers']} layers, more than the tensors it lists")
    try:
        with torch.device("meta"):
            network = cls(**config, dropout=0.0)
    except LMInputError as err:
        raise _NotAnExport(f"its network settings are invalid ({str(err).rstrip('.')})") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise _NotAnExport(f"its network settings are invalid ({type(err).__name__}: {_one_line(err)})") from None
    elements = sum(t.numel() for t in network_tensors(network)[0].values())
    if elements > max_elements:
        raise LMInputError(
            f"{folder} describes a {cls.__name__} of {elements:,} numbers ({4 * elements / 2**30:.1f} GiB as float32), "
            f"more than max_elements={max_elements:,}: pass a larger max_elements to load_exported if you trust this export."
        )
    return network


def _tensor_plans(manifest: dict, tensors: dict[str, torch.Tensor], ties: dict[str, str], cls: str) -> dict[str, dict]:
    """Each stored tensor's manifest entry, checked against the network: names, ties, shapes, dtypes, the
    quantization rule's choices (which tensors, block width) and a plausible count of non-zeros."""
    declared, bits, group_size = manifest["tensors"], manifest["bits"], manifest["group_size"]
    missing, extra = sorted(set(tensors) - set(declared)), sorted(set(declared) - set(tensors))
    if missing:
        raise _NotAnExport(f"its manifest does not declare {missing}, which the {cls} needs")
    if extra:
        raise _NotAnExport(f"its manifest declares {extra}, which the {cls} does not have")
    if manifest["ties"] != ties:
        raise _NotAnExport(f"its ties {manifest['ties']} are not the {cls}'s {ties}")
    plans = {}
    for name, tensor in tensors.items():
        info, shape = declared[name], list(tensor.shape)
        if not isinstance(info, dict) or info.get("shape") != shape:
            found = info.get("shape") if isinstance(info, dict) else info
            raise _NotAnExport(f"{name} is declared with shape {found}, the {cls} has {shape}")
        quantized, dtype = _stored_as(tensor, bits)
        if info.get("dtype") != dtype or info.get("quantized") is not quantized:
            raise _NotAnExport(
                f"{name} is declared {info.get('dtype')!r} (quantized: {info.get('quantized')!r}), "
                f"an export with bits={bits} stores it as {dtype!r}"
            )
        if dtype not in SAFETENSORS_DTYPES and not quantized:
            raise _NotAnExport(f"{name} has dtype {dtype}, which an export cannot store")
        nnz, numel = info.get("nnz"), math.prod(shape)
        if info.get("storage") not in STORAGES or type(nnz) is not int or not 0 <= nnz <= numel:
            raise _NotAnExport(f"{name} is declared as {info.get('storage')!r} storage with {nnz!r} non-zeros of {numel}")
        plan = {"shape": shape, "dtype": dtype, "quantized": quantized, "storage": info["storage"], "nnz": nnz}
        if quantized:
            try:
                plan["block"] = block_width(shape, bits, group_size, name)
            except LMInputError as err:
                raise _NotAnExport(f"its group_size does not fit the network ({err})") from None
            if info.get("block") != plan["block"]:
                raise _NotAnExport(f"{name} is declared with blocks of {info.get('block')!r}, its rule gives {plan['block']}")
        plans[name] = plan
    return plans


def _header_of(plans: dict[str, dict]) -> dict[str, tuple[str, list[int]]]:
    """The arrays ``export_model`` writes for these tensors (the inverse of ``_layouts``): name -> (dtype, shape)."""
    header: dict[str, tuple[str, list[int]]] = {}
    for name, plan in plans.items():
        numel, nnz, int4 = math.prod(plan["shape"]), plan["nnz"], plan["dtype"] == "int4"
        code = "U8" if int4 else ("I8" if plan["quantized"] else SAFETENSORS_DTYPES[plan["dtype"]])
        if plan["storage"] == "dense":
            header[name] = (code, [math.ceil(numel / 2)] if int4 else plan["shape"])
        else:
            header[f"{name}.values"] = (code, [math.ceil(nnz / 2) if int4 else nnz])
            if plan["storage"] == "bitmask":
                header[f"{name}.mask"] = ("U8", [math.ceil(numel / 8)])
            else:
                header[f"{name}.index"] = ("U16" if numel <= 2**16 else "U32", [nnz])
        if plan["quantized"]:
            header[f"{name}.scale"] = ("F32", [plan["shape"][0], plan["shape"][1] // plan["block"]])
    return header


def _check_header(path: Path, expected: dict[str, tuple[str, list[int]]]) -> None:
    """The safetensors header (8-byte length, JSON) holds exactly the expected arrays, back to back, to the file's end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise _NotAnExport(f"{WEIGHTS} has no valid safetensors header (it declares {length} bytes in a file of {size})")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as err:
            raise _NotAnExport(f"the safetensors header of {WEIGHTS} is not JSON ({_one_line(err)})") from None
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", None), dict):
        raise _NotAnExport(f"the safetensors header of {WEIGHTS} is not one written by export_model")
    if set(header) != set(expected):
        names = sorted(set(header) ^ set(expected))
        raise _NotAnExport(f"{WEIGHTS} holds other arrays than the manifest describes ({', '.join(names[:3])} differ)")
    spans = []
    for name, (dtype, shape) in expected.items():
        entry = header[name]
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != shape:
            found = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else entry
            raise _NotAnExport(f"{WEIGHTS} stores {name} as {found}, the manifest describes {(dtype, shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)) or (
            offsets[1] - offsets[0] != math.prod(shape) * ITEM_BYTES[dtype]
        ):
            raise _NotAnExport(f"{WEIGHTS} gives {name} the byte range {offsets}, which does not fit {dtype} {shape}")
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise _NotAnExport(f"the arrays of {WEIGHTS} overlap or leave gaps (at byte {begin})")
        end = stop
    if 8 + length + end != size:
        raise _NotAnExport(f"{WEIGHTS} holds {size} bytes, its header describes {8 + length + end}")
