"""The export format on disk: names, int4 packing, the sparse layouts and their decoding, which tensors are quantized.

``writer.py`` and ``onnx_writer.py`` write exports with these (``write_folder``: the atomic folder both formats share),
``loader.py`` loads them; ``checks.py`` checks an export against them before loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from lm_lightning.deploy.layout import GOOD_CHECKPOINT, sealed_manifest
from lm_lightning.errors import LMInputError
from lm_lightning.io import atomic_directory, atomic_path, disk_full, file_sha256

FORMAT, VERSION = "lm_lightning.export", 2
WEIGHTS, MANIFEST, VOCAB = "model.safetensors", "manifest.json", "vocab.json"
ENTRY_OVERHEAD = 64  # ~bytes one more array adds to the safetensors JSON header (dtype, shape, offsets)
STORAGES = ("dense", "bitmask", "coo")
SAFETENSORS_DTYPES = {
    "float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}  # fmt: skip
ITEM_BYTES = {code: np.dtype(name).itemsize for name, code in SAFETENSORS_DTYPES.items()}


class NotAnExport(Exception):
    """Why a folder is not a readable export; ``load_exported`` turns it into one ``LMInputError`` sentence, ending
    with ``fix``."""

    def __init__(self, why: str, fix: str = "export the model again") -> None:
        super().__init__(why)
        self.fix = fix


def pack_int4(codes: np.ndarray) -> np.ndarray:
    nibbles = (codes.astype(np.uint8) & 0xF).ravel()
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=1).ravel()[:count]
    return (nibbles.astype(np.int8) ^ 8) - 8  # sign-extend 4-bit two's complement


def layouts(values: np.ndarray, int4: bool) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Dense, bit mask + non-zeros, and indices + non-zeros; the caller keeps the smallest."""
    encode = pack_int4 if int4 else (lambda v: v)
    flat = values.ravel()
    nonzero = flat != 0
    candidates = [("dense", {"": encode(flat) if int4 else values})]
    kept = encode(flat[nonzero])
    candidates.append(("bitmask", {".mask": np.packbits(nonzero), ".values": kept}))
    index_dtype = np.uint16 if flat.size <= 2**16 else np.uint32
    candidates.append(("coo", {".index": np.flatnonzero(nonzero).astype(index_dtype), ".values": kept}))
    return candidates


def stored_bytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes + ENTRY_OVERHEAD for a in arrays.values())


def decode_values(arrays: dict[str, np.ndarray], info: dict, name: str) -> np.ndarray:
    """The flat values of one stored tensor; sparse positions are checked, so a bad index is refused, not written."""
    numel, int4 = math.prod(info["shape"]), info["dtype"] == "int4"
    if info["storage"] == "dense":
        flat = arrays[name].ravel()
        return unpack_int4(flat, numel) if int4 else flat
    values = arrays[f"{name}.values"]
    values = unpack_int4(values, info["nnz"]) if int4 else values
    out = np.zeros(numel, dtype=np.int8 if int4 else values.dtype)
    if info["storage"] == "bitmask":
        mask = np.unpackbits(arrays[f"{name}.mask"]).astype(bool)
        if mask[numel:].any() or np.count_nonzero(mask[:numel]) != info["nnz"]:
            raise NotAnExport(f"the bit mask of {name} does not mark its {info['nnz']} non-zeros")
        out[mask[:numel]] = values
    else:
        index = arrays[f"{name}.index"].astype(np.int64)
        if index.size and (index[-1] >= numel or np.any(np.diff(index) <= 0)):
            raise NotAnExport(f"the sparse indices of {name} are not increasing positions below {numel}")
        out[index] = values
    return out


def stored_as(tensor: torch.Tensor, bits: Optional[int]) -> tuple[bool, str]:
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


sha256 = file_sha256  # the name the export modules use


def header_of(plans: dict[str, dict]) -> dict[str, tuple[str, list[int]]]:
    """The arrays ``export_model`` writes for these tensors (the inverse of ``layouts``): name -> (dtype, shape)."""
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


def check_finite(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Refuse, before anything is written, weights holding NaN or infinite values (a diverged training): an export of
    them would load and generate garbage."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LMInputError(
                f"{name} holds NaN or infinite values ({bad:,} of {tensor.numel():,}: the training diverged), so nothing "
                f"was written to {folder}: {GOOD_CHECKPOINT}, or train again with a lower learning rate."
            )


def check_target(folder: Path) -> None:
    """An export goes to a new or empty folder, or replaces an export: never over a folder of someone else's files."""
    if folder.exists() and not (folder / MANIFEST).is_file() and (not folder.is_dir() or any(folder.iterdir())):
        raise LMInputError(f"{folder} exists and is not an export: choose an empty or new folder for the export.")


def write_folder(folder: Path, name: str, write: Callable[[Path], None], vocab: Any, manifest: dict) -> None:
    """Write an export atomically (a crash never leaves half of one; a re-export replaces the old folder only when
    complete): ``write(path)`` makes the file ``name``, then the vocabulary, then the manifest, to which this adds
    every file's size and SHA-256 (``files``) before ``metadata``, and its seal (``deploy/layout.py``). A full disk is
    one sentence, the temporary folder removed and the earlier export untouched."""
    with disk_space_for(folder), atomic_directory(folder, replace=True) as tmp:
        with atomic_path(tmp / name) as path:  # atomic_path: the file follows the umask whatever the writer does
            write(path)
        if vocab is not None:
            vocab.save(tmp / VOCAB)
        metadata = manifest.pop("metadata", None) or {}
        manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
        manifest["metadata"] = metadata
        (tmp / MANIFEST).write_text(sealed_manifest(manifest), encoding="utf-8")


@contextmanager
def disk_space_for(folder: Path, after: str = "nothing was written and any earlier export there is unchanged") -> Iterator[None]:
    """A write into ``folder`` that the full disk (or quota) cut short, as one sentence; ``after``: what the folder holds
    then. The atomic writers have already removed their temporary files when this runs."""
    try:
        yield
    except Exception as err:
        if not disk_full(err):
            raise
        raise LMInputError(
            f"The disk holding {folder} is full (or its quota is): {after}; free some space there or choose another "
            "--export.folder."
        ) from None
