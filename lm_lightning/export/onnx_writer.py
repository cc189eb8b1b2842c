"""``--export.format onnx``: a trained network as an ONNX graph that ONNX Runtime runs without torch.

    folder/model.onnx, folder/vocab.json, folder/manifest.json      (``deploy/layout.py`` describes them)

Any network of the template's contract exports, the LSTM and a fork's GRU alike: ``forward(ids, hidden)`` is traced
with its recurrent state as explicit inputs and outputs (the state's tensors flattened in order, the batch axis
found by running the network at two batch sizes), so generation carries the state from call to call and scoring
from window to window; the batch and time axes are dynamic.

The exporter is torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``: it maps ``nn.LSTM`` / ``nn.GRU``
to ONNX's own ``LSTM`` / ``GRU`` operators with the initial state as inputs, and keeps the time axis dynamic. The
``torch.export``-based exporter (``dynamo=True``, the default) specialized the time axis of an ``nn.LSTM`` to the
example's length when tried here (torch 2.13: the graph declares logits of time 5 for an example of 5 steps), needs
``onnxscript`` besides, and took 5x longer.

int8 / int4 weights: ``onnx_quantize.py`` writes the codes of the project's quantization rule into the graph. The
export is then loaded in ONNX Runtime and scored on the test split through it: the perplexity in the manifest is the
file's, which ``score`` reproduces.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lm_lightning.deploy.folder import open_export
from lm_lightning.deploy.layout import (
    DEFAULT_TOP_K,
    IDS,
    LOGITS,
    MODEL,
    ONNX_FORMAT,
    ONNX_VERSION,
    TOP_IDS,
    TOP_K,
    TOP_LOGITS,
)
from lm_lightning.deploy.runtime import graph_feeds
from lm_lightning.errors import LMInputError
from lm_lightning.export.format import check_finite, check_target, write_folder
from lm_lightning.export.onnx_quantize import rewrite_weights
from lm_lightning.export.quantization import check_quantization

__all__ = ["ACCURACY_LEVEL", "OPSET", "OnnxNetwork", "check_exportable", "export_onnx"]

OPSET = 18  # BitwiseAnd (int4 unpacking) and Pad's axes input need 18
# MatMulNBits' accuracy_level: 4 lets MLAS quantize the activations to int8 per block and multiply in integers. At
# WikiText-2's vocabulary it generated 32x (int8) and 2.5x (int4) faster than 0, which multiplies in float32, and moved
# a PTB model's test perplexity by 0.005% / 0.010% (the README has the figures).
ACCURACY_LEVEL = 4


class _FlatState(nn.Module):
    """``network(ids, hidden)`` with the hidden state as a flat list of tensors in and out."""

    def __init__(self, network: nn.Module, spec: Any) -> None:
        super().__init__()
        self.network, self.spec = network, spec

    def forward(self, ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, hidden = self.network(ids, tree_unflatten(list(state), self.spec))
        return (logits, *tree_flatten(hidden)[0])


def _state_of(network: nn.Module) -> tuple[list[torch.Tensor], Any, list[int]]:
    """The state a network starts from (its tensors for a batch of 2, its structure) and each tensor's batch axis."""
    with torch.no_grad():
        leaves, spec = tree_flatten(network(torch.zeros(2, 1, dtype=torch.long))[1])
        others = tree_flatten(network(torch.zeros(3, 1, dtype=torch.long))[1])[0]
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise LMInputError(
            f"{type(network).__name__} returns no tensor state from forward(ids): the ONNX export carries a recurrent "
            "network's state between calls; export it with --export.format safetensors."
        )
    axes = []
    for a, b in zip(leaves, others):
        differ = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
        if len(differ) != 1 or a.shape[differ[0]] != 2:
            raise LMInputError(
                f"{type(network).__name__}'s state {tuple(a.shape)} has no single batch axis: export it with --export.format safetensors."
            )
        axes.append(differ[0])
    return [torch.zeros_like(t) for t in leaves], spec, axes


def check_exportable(network: nn.Module) -> None:
    """Refuse, before training when the export step runs at the end of fit, a network the ONNX export does not cover."""
    if any(isinstance(m, nn.EmbeddingBag) for m in network.modules()):
        raise LMInputError(
            f"{type(network).__name__} reads bags of words (nn.EmbeddingBag with sparse bags), which the ONNX export does "
            "not cover: export it with --export.format safetensors."
        )


def onnx_graph(network: nn.Module) -> tuple[onnx.ModelProto, list[dict]]:
    """The network's float32 graph and its state's description (input and output names, shape, batch axis)."""
    check_exportable(network)
    network = network.eval().cpu()
    state, spec, axes = _state_of(network)
    names = [f"state_{i}" for i in range(len(state))]
    outputs = [f"{n}_out" for n in names]
    dynamic = {IDS: {0: "batch", 1: "time"}, LOGITS: {0: "batch", 1: "time"}}
    dynamic.update({n: {a: "batch"} for n, a in zip(names + outputs, axes + axes)})
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice and LSTM batch-size notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _FlatState(network, spec), (torch.zeros(2, 3, dtype=torch.long), *state), buffer, dynamo=False,
            input_names=[IDS, *names], output_names=[LOGITS, *outputs], dynamic_axes=dynamic, opset_version=OPSET,
        )  # fmt: skip
    described = [
        {"input": n, "output": o, "shape": [None if d == a else s for d, s in enumerate(t.shape)], "batch_axis": a}
        for n, o, t, a in zip(names, outputs, state, axes)
    ]
    return onnx.load_from_string(buffer.getvalue()), described


def export_onnx(
    network: nn.Module,
    folder: str | Path,
    bits: Optional[int] = None,
    group_size: int = 32,
    vocab: Any = None,
    metadata: Optional[dict] = None,
    network_spec: Optional[dict] = None,
    accuracy_level: int = ACCURACY_LEVEL,
) -> dict:
    """Write folder/model.onnx + vocab.json + manifest.json atomically (a crash never leaves half an export, and a
    re-export replaces the old folder only when complete). ``network`` is a plain network (no pruning hooks or fake
    quantization: ``writer.plain_copy``). Returns a report like ``export_model``'s."""
    check_quantization(bits, group_size)
    folder = Path(folder)
    check_target(folder)
    check_finite(network.state_dict(), folder)
    model, state = onnx_graph(network)
    formats = rewrite_weights(model, bits, group_size, accuracy_level)
    default_top_k = _add_top_k(model)
    onnx.checker.check_model(model)
    manifest = {
        "format": ONNX_FORMAT,
        "version": ONNX_VERSION,
        "bits": bits,
        "group_size": group_size,
        "network": network_spec or {"class": type(network).__name__},
        "graph": {
            "ids": IDS,
            "logits": LOGITS,
            "vocab_size": _vocab_size(model),
            "state": state,
            "opset": OPSET,
            "top_k": TOP_K,
            "top_logits": TOP_LOGITS,
            "top_ids": TOP_IDS,
            "default_top_k": default_top_k,
            "operators": sorted({n.op_type for n in model.graph.node}),
            "weights": formats,
            "accuracy_level": accuracy_level if bits else None,
        },  # fmt: skip
        "metadata": metadata,
    }
    write_folder(folder, MODEL, lambda path: path.write_bytes(model.SerializeToString()), vocab, manifest)
    return {
        "folder": str(folder),
        "bits": bits,
        "format": "onnx",
        "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "float32_bytes": 4 * sum(p.numel() for p in {id(p): p for p in network.parameters()}.values()),
        "weights": formats,
    }


def _add_top_k(model: onnx.ModelProto) -> int:
    """The last step's ``top_k`` likeliest tokens as two more outputs (``deploy/layout.py`` says why); returns the
    default k (ONNX Runtime runs the TopK on every call, so it must fit the vocabulary)."""
    graph, default = model.graph, min(DEFAULT_TOP_K, _vocab_size(model))
    last = f"{LOGITS}_last_step"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(-1, np.int64), f"{last}_index"),
            numpy_helper.from_array(np.array([default], np.int64), TOP_K),
        ]
    )
    graph.input.append(helper.make_tensor_value_info(TOP_K, TensorProto.INT64, [1]))
    graph.node.extend([
        helper.make_node("Gather", [LOGITS, f"{last}_index"], [last], name=last, axis=1),
        helper.make_node("TopK", [last, TOP_K], [TOP_LOGITS, TOP_IDS], name="top_k", axis=-1),
    ])  # fmt: skip
    graph.output.extend([
        helper.make_tensor_value_info(TOP_LOGITS, TensorProto.FLOAT, ["batch", "k"]),
        helper.make_tensor_value_info(TOP_IDS, TensorProto.INT64, ["batch", "k"]),
    ])  # fmt: skip
    return default


def _vocab_size(model: onnx.ModelProto) -> int:
    logits = next(o for o in model.graph.output if o.name == LOGITS)
    return logits.type.tensor_type.shape.dim[-1].dim_value


class OnnxNetwork(nn.Module):
    """An ONNX export run by ONNX Runtime behind the network contract (``forward(ids, hidden) -> (logits, hidden)``),
    so that ``evaluation.perplexity`` scores the file with the windows and the loss every other path uses."""

    def __init__(self, folder: str | Path, threads: Optional[int] = None) -> None:
        super().__init__()
        export = open_export(folder, threads or 1)  # the checks generate and score run: the file is measured as used
        self.graph, self.session = export.manifest["graph"], export.session

    def forward(self, ids: torch.Tensor, hidden: Optional[list[torch.Tensor]] = None) -> tuple[torch.Tensor, list]:
        state = [t.cpu().numpy() for t in hidden] if hidden is not None else None
        names = [self.graph["logits"], *(s["output"] for s in self.graph["state"])]
        logits, *state = self.session.run(names, graph_feeds(self.graph, ids.cpu().numpy(), state))
        return torch.from_numpy(logits), [torch.from_numpy(t) for t in state]
