"""The checks ``load_exported`` runs on an export folder before it reads a weight or allocates a network.

An export folder is untrusted input. In order: the manifest (a regular file of bounded size, JSON, format, version,
its seal (``deploy/layout.py``), types), the files (a fixed list of names, so nothing outside the folder is reached; the folder holds nothing else),
then, once ``rebuild.py`` has built the network the manifest describes on the ``meta`` device,
every tensor entry against that network and the export rule, and the safetensors header against the arrays the
writer produces for those entries. Each failure raises :class:`NotAnExport` with the reason.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import torch

from lm_lightning.deploy.layout import MANIFEST_SHA256, seal_broken
from lm_lightning.errors import LMInputError
from lm_lightning.export.format import (
    FORMAT,
    ITEM_BYTES,
    MANIFEST,
    SAFETENSORS_DTYPES,
    STORAGES,
    VERSION,
    VOCAB,
    WEIGHTS,
    NotAnExport,
    stored_as,
)
from lm_lightning.export.quantization import block_width
from lm_lightning.io import is_sha256

# The loader's ceilings: a manifest or header larger than these, or a network of more numbers, is refused unread.
MAX_MANIFEST_BYTES = 16 << 20  # a manifest takes ~300 bytes per tensor
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_ELEMENTS = 1 << 30  # 4 GiB of float32 weights; load_exported(max_elements=...) raises it


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def read_manifest(folder: Path) -> dict:
    """The manifest, its format and version, and the types of what the loader reads from it."""
    path = folder / MANIFEST
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise NotAnExport(f"{MANIFEST} is missing") from None
    except OSError as err:
        raise NotAnExport(f"{MANIFEST} cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MANIFEST_BYTES:
        raise NotAnExport(f"{MANIFEST} is not a regular file of at most {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise NotAnExport(f"{MANIFEST} cannot be read as JSON ({one_line(err)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else None
        raise NotAnExport(f"its manifest is {found}, this version reads ({FORMAT!r}, {VERSION})")
    if seal_broken(manifest):
        raise NotAnExport(f"{MANIFEST} does not match its own {MANIFEST_SHA256}: it was edited or damaged after the export")
    bits, group_size = manifest.get("bits"), manifest.get("group_size")
    if (
        "bits" not in manifest
        or not (bits is None or (type(bits) is int and bits in (4, 8)))
        or type(group_size) is not int
        or group_size < 1
    ):
        raise NotAnExport(f"its manifest declares bits {bits!r} and group_size {group_size!r}")
    spec = manifest.get("network")
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise NotAnExport("its manifest does not name the network's class")
    if spec.get("class_path") is not None and not isinstance(spec["class_path"], str):
        raise NotAnExport(f"its manifest's network class_path is {spec['class_path']!r}, not a dotted name")
    modules = spec.get("modules", {})
    if not isinstance(modules, dict) or not all(
        isinstance(name, str) and name.isidentifier() and isinstance(record, dict)
        and isinstance(record.get("class_path"), str) and isinstance(record.get("init_args"), dict)
        for name, record in modules.items()
    ):  # fmt: skip
        raise NotAnExport("its manifest's network modules are not {name: {class_path, init_args}} entries")
    for key in ("tensors", "ties", "files"):
        if not isinstance(manifest.get(key), dict):
            raise NotAnExport(f"its manifest's {key!r} is not a JSON object")
    return manifest


def check_files(folder: Path, files: dict) -> None:
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
            raise NotAnExport(f"its manifest lists {name!r}, {kind} ({WEIGHTS}, {VOCAB})")
        if not isinstance(entry, dict) or type(entry.get("bytes")) is not int or not is_sha256(entry.get("sha256")):
            raise NotAnExport(f"its manifest's entry for {name} has no byte count and SHA-256")
    if WEIGHTS not in files:
        raise NotAnExport(f"its manifest does not list {WEIGHTS}")
    try:
        present = {entry.name for entry in os.scandir(folder)} - {MANIFEST}
    except OSError as err:
        raise NotAnExport(f"the folder cannot be listed ({err.strerror})") from None
    if present - set(files):
        raise NotAnExport(
            f"{sorted(present - set(files))[0]} is in the folder but not in the manifest, which must list and hash every file"
        )
    for name, entry in files.items():
        try:
            info = (folder / name).lstat()
        except FileNotFoundError:
            raise NotAnExport(f"{name} is missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise NotAnExport(f"{name} is not a regular file")
        if info.st_size != entry["bytes"]:
            raise NotAnExport(f"{name} does not match the manifest (size or SHA-256 differ)")




def tensor_plans(manifest: dict, tensors: dict[str, torch.Tensor], ties: dict[str, str], cls: str) -> dict[str, dict]:
    """Each stored tensor's manifest entry, checked against the network: names, ties, shapes, dtypes, the
    quantization rule's choices (which tensors, block width) and a plausible count of non-zeros."""
    declared, bits, group_size = manifest["tensors"], manifest["bits"], manifest["group_size"]
    missing, extra = sorted(set(tensors) - set(declared)), sorted(set(declared) - set(tensors))
    if missing:
        raise NotAnExport(f"its manifest does not declare {missing}, which the {cls} needs")
    if extra:
        raise NotAnExport(f"its manifest declares {extra}, which the {cls} does not have")
    if manifest["ties"] != ties:
        raise NotAnExport(f"its ties {manifest['ties']} are not the {cls}'s {ties}")
    plans = {}
    for name, tensor in tensors.items():
        info, shape = declared[name], list(tensor.shape)
        if not isinstance(info, dict) or info.get("shape") != shape:
            found = info.get("shape") if isinstance(info, dict) else info
            raise NotAnExport(f"{name} is declared with shape {found}, the {cls} has {shape}")
        quantized, dtype = stored_as(tensor, bits)
        if info.get("dtype") != dtype or info.get("quantized") is not quantized:
            raise NotAnExport(
                f"{name} is declared {info.get('dtype')!r} (quantized: {info.get('quantized')!r}), "
                f"an export with bits={bits} stores it as {dtype!r}"
            )
        if dtype not in SAFETENSORS_DTYPES and not quantized:
            raise NotAnExport(f"{name} has dtype {dtype}, which an export cannot store")
        nnz, numel = info.get("nnz"), math.prod(shape)
        if info.get("storage") not in STORAGES or type(nnz) is not int or not 0 <= nnz <= numel:
            raise NotAnExport(f"{name} is declared as {info.get('storage')!r} storage with {nnz!r} non-zeros of {numel}")
        plan = {"shape": shape, "dtype": dtype, "quantized": quantized, "storage": info["storage"], "nnz": nnz}
        if quantized:
            try:
                plan["block"] = block_width(shape, bits, group_size, name)
            except LMInputError as err:
                raise NotAnExport(f"its group_size does not fit the network ({err})") from None
            if info.get("block") != plan["block"]:
                raise NotAnExport(f"{name} is declared with blocks of {info.get('block')!r}, its rule gives {plan['block']}")
        plans[name] = plan
    return plans


def check_header(path: Path, expected: dict[str, tuple[str, list[int]]]) -> None:
    """The safetensors header (8-byte length, JSON) holds exactly the expected arrays, back to back, to the file's end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise NotAnExport(f"{WEIGHTS} has no valid safetensors header (it declares {length} bytes in a file of {size})")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as err:
            raise NotAnExport(f"the safetensors header of {WEIGHTS} is not JSON ({one_line(err)})") from None
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", None), dict):
        raise NotAnExport(f"the safetensors header of {WEIGHTS} is not one written by export_model")
    if set(header) != set(expected):
        names = sorted(set(header) ^ set(expected))
        raise NotAnExport(f"{WEIGHTS} holds other arrays than the manifest describes ({', '.join(names[:3])} differ)")
    spans = []
    for name, (dtype, shape) in expected.items():
        entry = header[name]
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != shape:
            found = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else entry
            raise NotAnExport(f"{WEIGHTS} stores {name} as {found}, the manifest describes {(dtype, shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)) or (
            offsets[1] - offsets[0] != math.prod(shape) * ITEM_BYTES[dtype]
        ):
            raise NotAnExport(f"{WEIGHTS} gives {name} the byte range {offsets}, which does not fit {dtype} {shape}")
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise NotAnExport(f"the arrays of {WEIGHTS} overlap or leave gaps (at byte {begin})")
        end = stop
    if 8 + length + end != size:
        raise NotAnExport(f"{WEIGHTS} holds {size} bytes, its header describes {8 + length + end}")
