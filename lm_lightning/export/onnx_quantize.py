"""The run's integer weights written into an exported ONNX graph, codes and scales as they are.

``torch.onnx.export`` writes every weight in float32; this pass rewrites the graph's weight initializers by the
consumer that reads them, each matrix quantized by the project's own rule (``quantization.py``: the rule QAT trained
with, so the codes are those the run measured, not a fresh rounding by another tool):

* a product with a constant matrix (``MatMul``, ``Gemm``: the decoder) becomes ONNX Runtime's ``MatMulNBits``
  (com.microsoft), whose CPU kernels (MLAS) multiply int8 or packed int4 codes natively. Its blocks are powers of two
  of at least 16 inputs: a rule of one scale a row (int8) takes one block padded past the row's end, groups of a
  power of two are its blocks, and other group sizes (40 for a 200-wide model) are padded to the next power of two
  each, with the activations' columns gathered to match (a padded weight is 0, so the product is unchanged);
* an embedding lookup (``Gather`` on a constant matrix) gathers the rows' codes and scales and dequantizes only
  those rows; tied with the decoder, it reads the decoder's ``MatMulNBits`` codes: the matrix is stored once;
* a recurrent layer's matrices (``LSTM`` / ``GRU`` / ``RNN`` inputs W and R) are stored as codes and scales and
  dequantized by standard operators (``Cast``, ``Mul``; int4 unpacked by ``BitwiseAnd`` / ``BitShift``) that
  depend on constants only: ONNX Runtime folds them into float32 weights once, when it loads the graph, and the
  recurrent kernel then runs at float32's speed. These matrices are small beside a real vocabulary's.

Without bits, only the tie is restored: the exporter folds ``decoder.weight.T`` into a second copy of a tied
embedding, which becomes a ``Gemm`` (``transB``) on the embedding matrix itself.

Numpy + onnx, with torch only for the quantization rule. Pruned zeros stay zeros (a zero weight is code 0), stored
densely: ONNX Runtime's CPU kernels have no sparse int8/int4 product.
"""

from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from lm_lightning.export.quantization import quantize_weight

RNN_OPS = ("LSTM", "GRU", "RNN")
MS_DOMAIN = "com.microsoft"


class _Graph:
    """The graph's initializers as numpy arrays and a counter for fresh names; nodes are rewritten in place."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model, self.graph = model, model.graph
        self.arrays = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self._ids = itertools.count()

    def name(self, stem: str) -> str:
        return f"lm_{stem}_{next(self._ids)}"

    def const(self, array: np.ndarray, stem: str) -> str:
        name = self.name(stem)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.arrays[name] = array
        return name

    def node(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = self.name(op.lower())
        self.new_nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def matrix(self, name: str, dims: int) -> Optional[np.ndarray]:
        array = self.arrays.get(name)
        return array if array is not None and array.ndim == dims and array.dtype == np.float32 else None

    def drop_unused(self) -> None:
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)


def _key(matrix: np.ndarray) -> tuple:
    return matrix.shape, hash(matrix.tobytes())


def nbits_layout(codes: np.ndarray, scale: np.ndarray, bits: int) -> dict:
    """``MatMulNBits``' layout of ``(N, K)`` signed codes with ``(N, G)`` scales (groups of ``K / G`` inputs):
    ``B`` (N, blocks, bytes a block) of unsigned codes (code + 2^(bits-1), the operator's default zero point),
    ``scales`` (N, blocks), ``K`` and ``block`` for its attributes, and ``spread``: where each input column goes in
    the padded row (None when no column moves)."""
    rows, width = codes.shape
    groups = scale.shape[1]
    group = width // groups
    block = max(16, 1 << (group - 1).bit_length())
    if groups == 1 or group == block:  # one block padded past the row's end (the operator pads K), or exact blocks
        padded_width, spread = -(-width // block) * block, None
        padded = np.zeros((rows, padded_width), np.int16)
        padded[:, :width] = codes
        scales = np.repeat(scale, padded_width // block // groups, axis=1) if groups > 1 else scale
    else:  # each group padded to a block; the activations' columns are spread to match
        padded = np.zeros((rows, groups, block), np.int16)
        padded[:, :, :group] = codes.reshape(rows, groups, group)
        padded_width, scales = groups * block, scale
        spread = (np.arange(groups)[:, None] * block + np.arange(group)[None, :]).reshape(-1)
    unsigned = (padded.reshape(rows, -1, block) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        unsigned = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
    return {
        "B": unsigned, "scales": scales.astype(np.float32), "K": width if spread is None else padded_width,
        "width": width, "padded_width": padded_width, "block": block, "spread": spread,
    }  # fmt: skip


def _quantize(matrix: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    codes, scale = quantize_weight(torch.from_numpy(np.array(matrix, np.float32)), bits, group_size)
    return codes.numpy(), scale.numpy()


def rewrite_weights(model: onnx.ModelProto, bits: Optional[int], group_size: int, accuracy_level: int) -> dict[str, str]:
    """Rewrite ``model`` in place (see the module's docstring); returns ``{initializer: how it is stored}``."""
    g = _Graph(model)
    g.new_nodes = []
    formats: dict[str, str] = {}
    embeddings = {}  # _key(matrix) -> initializer name, for the tie
    for node in g.graph.node:
        if node.op_type == "Gather" and g.matrix(node.input[0], 2) is not None and _axis(node) == 0:
            embeddings.setdefault(_key(g.arrays[node.input[0]]), node.input[0])
    layouts: dict[tuple, tuple[dict, str, str]] = {}  # matrix -> (layout, B name, scales name)

    def layout_of(matrix: np.ndarray, stem: str) -> tuple[dict, str, str]:
        key = _key(matrix)
        if key not in layouts:
            lay = nbits_layout(*_quantize(matrix, bits, group_size), bits)
            layouts[key] = (lay, g.const(lay["B"], f"{stem}_codes"), g.const(lay["scales"], f"{stem}_scales"))
        return layouts[key]

    rewritten = []
    for node in list(g.graph.node):
        if node.op_type == "MatMul" and (b := g.matrix(node.input[1], 2)) is not None:
            weight = b.T  # the Linear's (out, in) matrix
        elif node.op_type == "Gemm" and (b := g.matrix(node.input[1], 2)) is not None and _plain_gemm(node):
            weight = b if _attr(node, "transB", 0) else b.T
        else:
            weight = None
        if weight is not None:
            tied = embeddings.get(_key(weight))
            if bits is None:
                if tied is not None and node.op_type == "MatMul":  # the exporter's transposed copy of a tied matrix
                    rewritten.append((node, _gemm_on_rows(g, node.input[0], tied, weight.shape)))
                    formats[tied] = "float32 (tied: Gather and Gemm)"
                continue
            lay, b_name, s_name = layout_of(weight, "linear")
            a = _spread(g, node.input[0], lay)
            attrs = dict(K=lay["K"], N=weight.shape[0], bits=bits, block_size=lay["block"], accuracy_level=accuracy_level)
            out = g.node("MatMulNBits", [a, b_name, s_name], domain=MS_DOMAIN, **attrs)
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                out = g.node("Add", [out, node.input[2]])
            rewritten.append((node, out))
            formats[tied or node.input[1]] = f"int{bits} MatMulNBits, blocks of {lay['block']}" + (" (tied)" if tied else "")
        elif bits is not None and node.op_type == "Gather" and (e := g.matrix(node.input[0], 2)) is not None and _axis(node) == 0:
            lay, b_name, s_name = layout_of(e, "embedding")
            rewritten.append((node, _dequantized_rows(g, b_name, s_name, node.input[1], lay, bits)))
            formats.setdefault(node.input[0], f"int{bits} rows gathered and dequantized")
        elif bits is not None and node.op_type in RNN_OPS:
            for position in (1, 2):  # W, R: (directions, rows, inputs)
                if (w := g.matrix(node.input[position], 3)) is not None:
                    role = "W (inputs)" if position == 1 else "R (recurrent)"
                    formats[f"{node.name or node.op_type} {role}"] = f"int{bits}, dequantized when the graph is loaded"
                    node.input[position] = _folded_weights(g, w, bits, group_size, node.input[position])
    for node, out in rewritten:
        for consumer in [*g.graph.node, *g.new_nodes]:  # a rewritten node may feed another (a projected embedding)
            for i, name in enumerate(consumer.input):
                if name == node.output[0]:
                    consumer.input[i] = out
        for output in g.graph.output:
            if output.name == node.output[0]:  # a graph output keeps its name: an Identity gives it
                g.new_nodes.append(helper.make_node("Identity", [out], [output.name]))
        g.graph.node.remove(node)
    _insert_sorted(g)
    g.drop_unused()
    if any(n.domain == MS_DOMAIN for n in g.graph.node) and all(o.domain != MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return formats


def _axis(node: onnx.NodeProto) -> int:
    return _attr(node, "axis", 0)


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _plain_gemm(node: onnx.NodeProto) -> bool:
    return _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0 and not _attr(node, "transA", 0)


def _gemm_on_rows(g: _Graph, a: str, rows: str, shape: tuple[int, int]) -> str:
    """``a @ rows.T`` for an ``a`` of any rank: flattened to 2-D, ``Gemm(transB=1)``, shaped back."""
    out_features, in_features = shape
    flat = g.node("Reshape", [a, g.const(np.array([-1, in_features], np.int64), "shape")])
    product = g.node("Gemm", [flat, rows], transB=1)
    lead = g.node("Shape", [a], start=0, end=-1)
    shape_out = g.node("Concat", [lead, g.const(np.array([out_features], np.int64), "width")], axis=0)
    return g.node("Reshape", [product, shape_out])


def _spread(g: _Graph, a: str, lay: dict) -> str:
    """The activations with their columns moved to the padded groups' positions (a zero column fills the padding)."""
    if lay["spread"] is None:
        return a
    index = np.full(lay["padded_width"], lay["width"], np.int64)  # padding reads the appended zero column
    index[lay["spread"]] = np.arange(lay["width"])
    padded = g.node("Pad", [a, g.const(np.array([0, 1], np.int64), "pads"), "", g.const(np.array([-1], np.int64), "axes")])
    return g.node("Gather", [padded, g.const(index, "spread")], axis=-1)


def _dequantized_rows(g: _Graph, b: str, scales: str, ids: str, lay: dict, bits: int) -> str:
    """Rows ``ids`` of a ``MatMulNBits`` matrix as float32 ``(*ids.shape, width)``: gather codes and scales, unpack."""
    codes = g.node("Gather", [b, ids], axis=0)  # (*ids, blocks, bytes)
    blocks = lay["padded_width"] // lay["block"]
    if bits == 4:
        low = g.node("BitwiseAnd", [codes, g.const(np.array(15, np.uint8), "low")])
        high = g.node("BitShift", [codes, g.const(np.array(4, np.uint8), "four")], direction="RIGHT")
        axis = g.const(np.array([-1], np.int64), "last")
        codes = g.node("Concat", [g.node("Unsqueeze", [low, axis]), g.node("Unsqueeze", [high, axis])], axis=-1)
    lead = g.node("Shape", [ids])
    shape = g.node("Concat", [lead, g.const(np.array([blocks, lay["block"]], np.int64), "blocks")], axis=0)
    values = g.node("Sub", [g.node("Cast", [g.node("Reshape", [codes, shape])], to=TensorProto.FLOAT),
                            g.const(np.array(1 << (bits - 1), np.float32), "zero")])  # fmt: skip
    row_scales = g.node("Unsqueeze", [g.node("Gather", [scales, ids], axis=0), g.const(np.array([-1], np.int64), "last")])
    flat_shape = g.node("Concat", [lead, g.const(np.array([lay["padded_width"]], np.int64), "width")], axis=0)
    rows = g.node("Reshape", [g.node("Mul", [values, row_scales]), flat_shape])
    if lay["padded_width"] == lay["width"]:
        return rows
    keep = lay["spread"] if lay["spread"] is not None else np.arange(lay["width"])
    return g.node("Gather", [rows, g.const(keep.astype(np.int64), "keep")], axis=-1)


def _folded_weights(g: _Graph, weights: np.ndarray, bits: int, group_size: int, stem: str) -> str:
    """A recurrent layer's (directions, rows, inputs) matrix as codes and scales, dequantized by operators on
    constants only (ONNX Runtime folds them when it loads the graph)."""
    quantized = [_quantize(w, bits, group_size) for w in weights]
    codes = np.stack([c for c, _ in quantized]).astype(np.int8)  # (dirs, rows, inputs)
    scales = np.stack([s for _, s in quantized])  # (dirs, rows, groups)
    shape = codes.shape
    grouped = (*scales.shape, shape[-1] // scales.shape[-1])
    if bits == 8:
        values = g.node("Cast", [g.const(codes.reshape(grouped), "rnn_codes")], to=TensorProto.FLOAT)
    else:
        flat = (codes.reshape(-1).astype(np.int16) + 8).astype(np.uint8)
        flat = np.append(flat, np.uint8(8)) if flat.size % 2 else flat
        packed = g.const(flat[0::2] | (flat[1::2] << 4), "rnn_codes")
        low = g.node("BitwiseAnd", [packed, g.const(np.array(15, np.uint8), "low")])
        high = g.node("BitShift", [packed, g.const(np.array(4, np.uint8), "four")], direction="RIGHT")
        axis = g.const(np.array([-1], np.int64), "last")
        both = g.node("Concat", [g.node("Unsqueeze", [low, axis]), g.node("Unsqueeze", [high, axis])], axis=-1)
        nibbles = g.node("Slice", [g.node("Reshape", [both, g.const(np.array([-1], np.int64), "flat")]),
                                   g.const(np.array([0], np.int64), "start"), g.const(np.array([codes.size], np.int64), "end")])  # fmt: skip
        unsigned = g.node("Cast", [g.node("Reshape", [nibbles, g.const(np.array(grouped, np.int64), "grouped")])], to=TensorProto.FLOAT)
        values = g.node("Sub", [unsigned, g.const(np.array(8, np.float32), "zero")])
    scaled = g.node("Mul", [values, g.const(scales[..., None].astype(np.float32), "rnn_scales")])
    return g.node("Reshape", [scaled, g.const(np.array(shape, np.int64), "shape")])


def _insert_sorted(g: _Graph) -> None:
    """Add the new nodes and put the whole graph in an order where every input is produced before it is read."""
    nodes = list(g.graph.node) + g.new_nodes
    produced = {i.name for i in g.graph.input} | {t.name for t in g.graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            raise RuntimeError(f"the rewritten ONNX graph has a cycle or a missing input near {pending[0].op_type}")
        for n in ready:
            produced.update(n.output)
        ordered += ready
        taken = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in taken]
    del g.graph.node[:]
    g.graph.node.extend(ordered)
