"""Writing an export: a trained network's weights in safetensors, int8 / int4 / float32, stored sparsely where smaller.

    folder/model.safetensors   integer codes + scales (quantized matrices), float32 for the rest; no pickle
    folder/manifest.json       format version, network class path and constructor arguments, bits, per-tensor
                               formats, ties, file hashes
    folder/vocab.json          the vocabulary, when given

Any network works: its state dict is exported as it is, a tensor shared by two names (a tied embedding/decoder) is
stored once, and with ``bits`` every floating 2-D tensor (embedding, LSTM/GRU and decoder matrices) is quantized by
the rule of ``quantization.py``. :func:`export_model` takes a plain network; :func:`export_network` (the export step
of fit and of ``python -m lm_lightning export``) first makes that plain copy (pruning made permanent, fake
quantization off), then loads the export back and scores it.

What this adds to safetensors/torchao: sparse storage (symmetric quantization maps 0 to 0, so pruned zeros stay
zero; a tensor is stored as a bit mask or a list of indices plus its non-zero values whenever that is smaller,
index bytes counted), tied weights stored once, an atomic folder write, and a manifest from which ``loader.py``
rebuilds and checks the network. The format's names and layouts are in ``format.py``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.utils.prune as torch_prune
from safetensors import SafetensorError
from safetensors.numpy import save_file
from torch import nn

from lm_lightning.evaluation import perplexity
from lm_lightning.export.fake_quantization import disable_fake_quantization
from lm_lightning.export.format import (
    FORMAT,
    VERSION,
    WEIGHTS,
    check_finite,
    check_target,
    disk_space_for,
    layouts,
    network_tensors,
    stored_as,
    stored_bytes,
    write_folder,
)
from lm_lightning.export.loader import load_exported, record_evaluation
from lm_lightning.export.onnx_writer import OnnxNetwork, export_onnx
from lm_lightning.export.quantization import block_width, check_quantization, quantize_weight
from lm_lightning.networks import NETWORKS
from lm_lightning.networks.contract import class_path

if TYPE_CHECKING:
    from lm_lightning.data import Vocabulary

__all__ = ["describe", "export_model", "export_network", "network_spec", "plain_copy", "test_batch_limit"]


def network_spec(network: nn.Module, init_args: Optional[dict] = None) -> dict:
    """What the manifest records to rebuild ``network``: its class name and class path (module + qualified name), and
    its constructor arguments (``init_args`` as the CLI built it, else the network's ``config`` attribute)."""
    cls = type(network)
    config = dict(init_args) if init_args is not None else getattr(network, "config", None)
    if NETWORKS.get(cls.__name__) is cls and isinstance(config, dict):
        config.pop("dropout", None)  # the loader builds the template's networks with dropout 0 (eval mode)
    spec = {"class": cls.__name__, "class_path": class_path(network), "config": config}
    if getattr(network, "replaced_modules", None):  # layers a memory strategy put in (adaptive input and softmax)
        spec["modules"] = {name: dict(record) for name, record in network.replaced_modules.items()}
    return spec


def export_model(
    network: nn.Module,
    folder: str | Path,
    bits: int | None = None,
    group_size: int = 32,
    vocab: Vocabulary | None = None,
    metadata: dict | None = None,
    network_init_args: dict | None = None,
) -> dict:
    """Write folder/model.safetensors + folder/manifest.json (+ folder/vocab.json when vocab is given), atomically:
    a crash never leaves a half-written export and a re-export replaces the old one only when complete.
    bits=None keeps float32 values (still stored sparsely where that is smaller); 8 = int8 per output channel; 4 = int4
    groups of group_size along the input dimension, packed two per byte. The manifest records the network's class path
    and ``network_init_args`` (else the network's ``config``), from which ``load_exported`` rebuilds it. Returns a report dict that includes at least
    {"bytes": total size of the folder's files, "tensors": {name: {"format": ..., "bytes": ...}}}."""
    check_quantization(bits, group_size)
    folder = Path(folder)
    check_target(folder)
    tensors, ties = network_tensors(network)
    check_finite(tensors, folder)
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

    spec = network_spec(network, network_init_args)
    manifest = {
        "format": FORMAT, "version": VERSION, "bits": bits, "group_size": group_size, "network": spec,
        "tensors": entries, "ties": ties, "metadata": metadata,
    }  # fmt: skip
    write_folder(folder, WEIGHTS, lambda path: _save_safetensors(arrays, path), vocab, manifest)
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


def _save_safetensors(arrays: dict[str, np.ndarray], path: Path) -> None:
    """safetensors writes through its own open() (``write_folder``'s atomic_path keeps the file's mode the umask's)
    and reports a failed write as a SafetensorError without an errno: raised as an OSError, whose message
    ("No space left on device") ``io.disk_full`` reads."""
    try:
        save_file(arrays, str(path), metadata={"format": FORMAT})
    except SafetensorError as err:
        raise OSError(f"{WEIGHTS} could not be written ({err})") from err


def plain_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` with pruning made permanent (plain weights with zeros) and fake quantization off;
    the live network is left as it is."""
    for module in network.modules():  # torch's pruning pre-hook leaves a non-leaf ``weight``, which deepcopy refuses
        for name, tensor in list(vars(module).items()):
            if isinstance(tensor, torch.Tensor) and not tensor.is_leaf:
                setattr(module, name, tensor.detach())
    plain = copy.deepcopy(network)
    for module in plain.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                hook.remove(module)  # weight_orig becomes weight = orig * mask (the same Parameter: ties survive)
                del module._forward_pre_hooks[key]
    disable_fake_quantization(plain)
    return plain


def export_network(
    network: nn.Module,
    folder: Path,
    bits: Optional[int],
    group_size: int,
    datamodule: Any = None,
    metadata: Optional[dict] = None,
    test_batches: Optional[int] = None,
    network_init_args: Optional[dict] = None,
    format: str = "safetensors",
) -> dict:
    """Export a plain copy of ``network`` with the datamodule's vocabulary, as safetensors or ONNX (``format``), then
    score the loaded export on the test split (``test_batches``: at most that many windows; 0 skips it): an ONNX
    export through ONNX Runtime. Returns ``export_model``'s (or ``export_onnx``'s) report + ``test_ppl``."""
    plain = plain_copy(network)
    metadata = dict(metadata or {})
    if hasattr(datamodule, "export_settings"):  # how to read text: `generate` and `score` need no datamodule then
        metadata["text"] = datamodule.export_settings()
    vocab = getattr(datamodule, "vocab", None)
    if format == "onnx":
        spec = network_spec(plain, network_init_args)
        report = export_onnx(plain.cpu(), folder, bits, group_size, vocab, metadata, spec)
    else:
        report = export_model(plain, folder, bits, group_size, vocab, metadata, network_init_args)
    report["test_ppl"] = None
    if test_batches != 0 and hasattr(datamodule, "test_dataloader"):
        # Measured on the export as `generate` and `score` load it (ONNX Runtime; or float32 with the codes dequantized),
        # and written into its manifest: `score` on the same text reproduces this figure. A fork's network is loaded
        # into the plain copy: a class defined where it cannot be imported again (a notebook, a test) is still measured.
        if format == "onnx":
            loaded, device = OnnxNetwork(folder), torch.device("cpu")
        else:
            same = NETWORKS.get(type(plain).__name__) is type(plain)
            loaded, device = (
                (load_exported(folder) if same else load_exported(folder, network=plain)),
                next(network.parameters()).device,
            )
        datamodule.setup("test")
        report["test_ppl"] = perplexity(loaded.to(device), datamodule.test_dataloader(), test_batches, device)
        with disk_space_for(folder, after="the export is complete, but its manifest could not record its test perplexity"):
            record_evaluation(folder, {"test_ppl": report["test_ppl"], "test_batches": test_batches})
        report["bytes"] = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())  # the manifest grew
    return report


def describe(report: dict) -> str:
    kind = (f"int{report['bits']}" if report["bits"] else "float32") + (" ONNX" if report.get("format") == "onnx" else "")
    ppl = f"{report['test_ppl']:.2f}" if report["test_ppl"] is not None else "not measured"
    share = report["bytes"] / report["float32_bytes"]
    size = f"{report['bytes']:,} bytes ({share:.0%} of float32 weights)"
    return f"Exported the {kind} model to {report['folder']}: {size}, test perplexity {ppl}"


def test_batch_limit(trainer: L.Trainer, datamodule: Any) -> Optional[int]:
    """``--trainer.limit_test_batches`` as a window count (``None``: all); 0 means no test evaluation is wanted."""
    limit = trainer.limit_test_batches
    if isinstance(limit, int):
        return limit
    if limit >= 1.0:
        return None
    datamodule.setup("test")
    return int(len(datamodule.test_dataloader()) * limit)
