"""Integer export of an :class:`LSTMLanguageModel`: int8 / int4 weights + scales in safetensors, no pickle.

    folder/model.safetensors   integer codes, scales, float biases (a plain float32 state dict when bits=None)
    folder/manifest.json       format version, network hyper-parameters, bits, per-tensor formats, file hashes
    folder/vocab.json          the vocabulary, when given

The quantization rule is symmetric and weight-only (Jacob et al. 2018, arXiv:1712.05877): int8 keeps one scale
per output row; int4 one scale per ``group_size`` inputs (as GPTQ/AWQ-style int4 checkpoints do), two codes per
byte. Scales and codes come from torchao's public primitives (``choose_qparams_affine`` / ``quantize_affine``),
bit-identical to ``torchao.quantization.qat.IntxFakeQuantizer`` (a test holds them equal). :func:`fake_quantize`,
used for quantization-aware training (``callbacks/quantization.py``), calls the same :func:`quantize_weight`, so
the loaded export reproduces the fake-quantized model's weights bit for bit.

What this adds to safetensors/torchao: sparse storage (symmetric quantization maps 0 to 0, so pruned zeros stay
zero; a tensor is stored as a bit mask or a list of indices plus its non-zero values whenever that is smaller,
index bytes counted), tied weights stored once, an atomic folder write, and a checked loader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from torch import nn
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

from lm_lightning.errors import LMInputError
from lm_lightning.models import LSTMLanguageModel

if TYPE_CHECKING:
    from lm_lightning.data import Vocabulary

FORMAT, VERSION = "lm_lightning.export", 1
WEIGHTS, MANIFEST, VOCAB = "model.safetensors", "manifest.json", "vocab.json"
ENTRY_OVERHEAD = 64  # ~bytes one more array adds to the safetensors JSON header (dtype, shape, offsets)


# --- the quantization rule (shared with fake quantization) ------------------------------------------------
def check_quantization(bits: Optional[int], group_size: int) -> None:
    if bits not in (None, 4, 8):
        raise LMInputError(f"bits must be 8 (int8 per output channel) or 4 (int4 groups), got {bits}.")
    if bits == 4 and (not isinstance(group_size, int) or group_size < 2):
        raise LMInputError(f"group_size must be an integer of at least 2, got {group_size}.")


def block_width(weight_shape: torch.Size | tuple, bits: int, group_size: int, name: str = "weight") -> int:
    """Inputs sharing one scale: the whole row for int8, ``group_size`` for int4 (which must divide the row)."""
    width = int(weight_shape[-1])
    if bits == 8:
        return width
    if width % group_size:
        divisors = [d for d in (32, 64, 16, 128, 8) if width % d == 0]
        raise LMInputError(
            f"group_size {group_size} does not divide the input width {width} of {name}: "
            f"choose a divisor of {width}{f' such as {divisors[0]}' if divisors else ''}."
        )
    return group_size


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes (int8 tensor, values in [-2^(bits-1), 2^(bits-1)-1]) and float32 scales (rows, blocks)."""
    block = (1, block_width(weight.shape, bits, group_size))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale, zero_point = choose_qparams_affine(weight, MappingType.SYMMETRIC, block, torch.int8, qmin, qmax, scale_dtype=torch.float32, zero_point_dtype=torch.int8)
    codes = quantize_affine(weight, block, scale, zero_point, torch.int8, qmin, qmax)
    return codes, scale.reshape(weight.shape[0], -1)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, blocks = scale.shape
    return (codes.reshape(rows, blocks, -1).float() * scale.unsqueeze(-1)).reshape(codes.shape)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int = 32) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in the forward pass, identity gradient (straight-through estimator, Bengio
    et al. 2013). ``w - w.detach()`` is exactly zero, so the forward value is the exported weight bit for bit."""
    quantized = dequantize_weight(*quantize_weight(weight, bits, group_size)).to(weight.dtype)
    return quantized + (weight - weight.detach())


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
def _effective(module: nn.Module, attr: str) -> torch.Tensor:
    """The weight the module computes with; under ``torch.nn.utils.prune`` that is ``orig * mask``, recomputed
    here because the ``weight`` attribute is refreshed only at the next forward (after the last optimizer step)."""
    if hasattr(module, f"{attr}_orig") and hasattr(module, f"{attr}_mask"):
        return getattr(module, f"{attr}_orig") * getattr(module, f"{attr}_mask")
    return getattr(module, attr)


def _base(module: nn.Module, attr: str) -> Any:
    return module._parameters.get(attr, module._parameters.get(f"{attr}_orig"))


def network_spec(network: nn.Module) -> dict[str, Any]:
    if not isinstance(network, LSTMLanguageModel):
        raise LMInputError(f"The export supports LSTMLanguageModel networks only, got {type(network).__name__}: export its weights with safetensors directly.")
    decoder_weight = _base(network.decoder, "weight")
    tied = decoder_weight is not None and decoder_weight is _base(network.embedding, "weight")
    return {
        "class": "LSTMLanguageModel",
        "vocab_size": network.embedding.num_embeddings,
        "embedding_dim": network.embedding.embedding_dim,
        "hidden_dim": network.lstm.hidden_size,
        "num_layers": network.lstm.num_layers,
        "tie_weights": tied,
    }


def _tensors(network: LSTMLanguageModel, tied: bool) -> dict[str, torch.Tensor]:
    names = [("embedding", "weight")] + [("lstm", n) for n in network.lstm._flat_weights_names]
    names += [("decoder", "bias")] if tied else [("decoder", "weight"), ("decoder", "bias")]
    return {f"{m}.{a}": _effective(getattr(network, m), a).detach().float() for m, a in names}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_model(network: nn.Module, folder: str | Path, bits: int | None = None, group_size: int = 32,
                 vocab: Vocabulary | None = None, metadata: dict | None = None) -> dict:
    """Write folder/model.safetensors + folder/manifest.json (+ folder/vocab.json when vocab is given), atomically:
    a crash never leaves a half-written export and a re-export replaces the old one only when complete.
    bits=None keeps float32 values (still stored sparsely where that is smaller); 8 = int8 per output channel; 4 = int4 groups
    of group_size along the input dimension, packed two per byte. Returns a report dict that includes at least
    {"bytes": total size of the folder's files, "tensors": {name: {"format": ..., "bytes": ...}}}."""
    check_quantization(bits, group_size)
    spec = network_spec(network)
    folder = Path(folder)
    if folder.exists() and not (folder / MANIFEST).is_file() and (not folder.is_dir() or any(folder.iterdir())):
        raise LMInputError(f"{folder} exists and is not an export: choose an empty or new folder for the export.")
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    for name, weight in _tensors(network, spec["tie_weights"]).items():
        quantized = bits is not None and weight.dim() == 2
        info: dict[str, Any] = {"shape": list(weight.shape), "dtype": f"int{bits}" if quantized else "float32"}
        if quantized:
            info["block"] = block_width(weight.shape, bits, group_size, name)
            # Quantized where the network lives, as fake quantization was: a GPU's reciprocal can round differently.
            codes, scale = (t.cpu() for t in quantize_weight(weight, bits, group_size))
            values = codes.numpy()
            arrays[f"{name}.scale"] = scale.numpy()
        else:
            values = weight.cpu().numpy()
        storage, chosen = min(_layouts(values, info["dtype"] == "int4"), key=lambda c: _stored_bytes(c[1]))
        info.update(storage=storage, nnz=int(np.count_nonzero(values)))
        arrays.update({name + suffix: np.ascontiguousarray(a) for suffix, a in chosen.items()})
        info["bytes"] = sum(a.nbytes for k, a in arrays.items() if k == name or k.startswith(name + "."))
        entries[name] = info

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_file(arrays, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if vocab is not None:
            vocab.save(tmp / VOCAB)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "version": VERSION, "bits": bits, "group_size": group_size, "network": spec,
                    "tensors": entries, "files": files, "metadata": metadata or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700 folders
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tensors = {n: {"format": e["dtype"] if e["storage"] == "dense" else f"{e['dtype']}+{e['storage']}", "bytes": e["bytes"]} for n, e in entries.items()}
    return {
        "folder": str(folder),
        "bits": bits,
        "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "float32_bytes": 4 * sum(math.prod(e["shape"]) for e in entries.values()),
        "tensors": tensors,
    }


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Move the finished export into place. Two renames: an old export is moved aside, not deleted, until the
    new one is in place (only a crash between the two renames leaves it under ``.<name>.<id>.old``)."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.old"
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except OSError:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- loading ---------------------------------------------------------------------------------------------
def load_exported(folder: str | Path) -> LSTMLanguageModel:
    """Rebuild the exported network: runnable, eval mode, float32 weights (dequantized), tied as exported."""
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
        arrays = load_file(str(folder / WEIGHTS))
        spec, entries = manifest["network"], manifest["tensors"]
        network = LSTMLanguageModel(spec["vocab_size"], spec["embedding_dim"], spec["hidden_dim"], spec["num_layers"], 0.0, spec["tie_weights"])
        expected_names = set(_tensors(network, spec["tie_weights"]))
        if set(entries) != expected_names:
            raise bad(f"it stores {sorted(entries)}, the network needs {sorted(expected_names)}")
        state = {}
        for name, info in entries.items():
            values = _decode_values(arrays, info, name)
            if info["dtype"] == "float32":
                tensor = torch.from_numpy(values.astype(np.float32)).reshape(info["shape"])
            else:
                codes = torch.from_numpy(values.astype(np.int8)).reshape(info["shape"])
                tensor = dequantize_weight(codes, torch.from_numpy(arrays[f"{name}.scale"]))
            state[name] = tensor
    except LMInputError as err:
        if str(err).startswith(f"{folder} "):
            raise
        raise bad(f"its network settings are invalid ({err})") from None
    except (KeyError, ValueError, TypeError, RuntimeError, OSError) as err:
        raise bad(f"its content does not match the manifest ({type(err).__name__}: {err})") from None
    if spec["tie_weights"]:
        state["decoder.weight"] = state["embedding.weight"]
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err)]
        raise bad(f"a tensor has the wrong shape ({details[0]})") from None
    return network.eval()


# --- evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(network: nn.Module, batches: Iterable, max_batches: Optional[int] = None, device: Optional[torch.device | str] = None) -> float:
    """Token-weighted perplexity over consecutive ``(inputs, targets)`` windows, carrying the hidden state from
    one window to the next as ``LanguageModel.test_step`` does (e.g. ``datamodule.test_dataloader()``)."""
    was_training = network.training
    network.eval()
    device = torch.device(device) if device is not None else next(network.parameters()).device
    hidden, total, count = None, 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        inputs, targets = batch[0].to(device), batch[1].to(device)
        logits, hidden = network(inputs, hidden)
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    network.train(was_training)
    if count == 0:
        raise LMInputError("perplexity needs at least one batch: the evaluation split is empty.")
    return math.exp(total / count)
