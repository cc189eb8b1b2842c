"""Integer weights resident at inference: a loaded int8/int4 export runs on its codes, never on a float copy.

``load_exported`` (``loader.py``) puts these modules in place of the network's ``nn.Embedding``, ``nn.EmbeddingBag``,
``nn.Linear`` and recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) when the export is quantized, each matrix an
:class:`~lm_lightning.export.integer_matrix.IntegerMatrix`. The network's own code is unchanged: it still calls
``self.embedding(ids)``, ``self.lstm(x, hidden)`` and ``self.decoder(output)``.

* :class:`IntegerLSTM` runs the LSTM equations step by step on those products (the input projection of a whole
  window in one product, the recurrent one per step), with PyTorch's gate order and the biases in float32. A window
  of several steps dequantizes each layer's recurrent matrix once, one layer at a time, instead of once a step.
* :class:`IntegerRNN` runs any other ``nn.RNNBase`` (a GRU, an Elman RNN, a bidirectional or projected LSTM) with
  torch's own kernel: its matrices stay integer codes, dequantized into the kernel's flat weights once per call (a
  window, or a step when generating) and dropped after it.
* Embedding lookups dequantize only the rows they read.

What this costs in accuracy: the products sum in a different order from a float matmul, so logits differ from the
dequantized float network's by float rounding (~1e-6 relative); the export's test perplexity is measured through
these modules, so it is the figure a user reproduces with ``score``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lm_lightning.errors import LMInputError
from lm_lightning.export.integer_matrix import IntegerMatrix

__all__ = ["IntegerEmbedding", "IntegerEmbeddingBag", "IntegerLinear", "IntegerLSTM", "IntegerRNN", "integer_rnn", "resident_bytes"]


class IntegerEmbedding(nn.Module):
    def __init__(self, weight: IntegerMatrix) -> None:
        super().__init__()
        self.weight_q = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_q.rows(ids)


class IntegerEmbeddingBag(nn.Module):
    """``nn.EmbeddingBag`` (sum or mean, per-sample weights, ``include_last_offset``) reading only the bags' rows."""

    def __init__(self, weight: IntegerMatrix, like: nn.EmbeddingBag) -> None:
        super().__init__()
        self.weight_q = weight
        self.mode, self.include_last_offset = like.mode, like.include_last_offset

    def forward(
        self, input: torch.Tensor, offsets: Optional[torch.Tensor] = None, per_sample_weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        # The rows the bags name, dequantized once; then torch's own bag reduction over them (positions 0..n-1).
        rows = self.weight_q.rows(input.reshape(-1))
        positions = torch.arange(rows.shape[0], device=rows.device).reshape(input.shape)
        return F.embedding_bag(
            positions, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
            include_last_offset=self.include_last_offset,
        )  # fmt: skip


class IntegerLinear(nn.Module):
    def __init__(self, weight: IntegerMatrix, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.weight_q = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight_q.linear(x, self.bias)


class IntegerLSTM(nn.Module):
    """An eval-mode ``nn.LSTM`` (batch_first, unidirectional, no projection) on integer weights.

    Per layer: ``gates = x W_ih^T + b_ih + h W_hh^T + b_hh`` in the order input, forget, cell, output;
    ``c = f * c + i * g``, ``h = o * tanh(c)``. The input projection covers the whole window in one product.
    """

    def __init__(self, like: nn.LSTM, weights: dict[str, IntegerMatrix], biases: dict[str, torch.Tensor]) -> None:
        super().__init__()
        if not like.batch_first or like.bidirectional or like.proj_size:
            raise LMInputError(
                "Integer inference runs batch_first, unidirectional LSTMs without projections: load this export with "
                "dequantize=True."
            )
        self.num_layers, self.hidden_size = like.num_layers, like.hidden_size
        self.input_weights = nn.ModuleList(weights[f"weight_ih_l{k}"] for k in range(self.num_layers))
        self.hidden_weights = nn.ModuleList(weights[f"weight_hh_l{k}"] for k in range(self.num_layers))
        # The two biases summed once: the same gates up to float rounding, one addition less per step.
        for k in range(self.num_layers):
            self.register_buffer(f"bias_l{k}", biases[f"bias_ih_l{k}"] + biases[f"bias_hh_l{k}"] if like.bias else None)

    def forward(
        self, input: torch.Tensor, hx: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batch, steps = input.shape[:2]
        if hx is None:
            zeros = input.new_zeros(self.num_layers, batch, self.hidden_size, dtype=torch.float32)
            hx = (zeros, zeros)
        h_all, c_all = [], []
        x = input
        for layer in range(self.num_layers):
            projected = self.input_weights[layer].linear(x, getattr(self, f"bias_l{layer}"))
            h, c = hx[0][layer], hx[1][layer]
            # A window of several steps dequantizes the recurrent matrix once (one block), not once a step.
            recurrent = self.hidden_weights[layer]
            weight = recurrent.dequantized_block() if steps > 1 and not torch.is_grad_enabled() else None
            outputs = []
            for t in range(steps):
                gates = projected[:, t] + (recurrent.linear(h) if weight is None else h @ weight.T)
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
            h_all.append(h)
            c_all.append(c)
        return x, (torch.stack(h_all), torch.stack(c_all))


class IntegerRNN:
    """Mixed into any ``nn.RNNBase`` class (``IntegerGRU``, ``IntegerRNN_TANH``... made by :func:`integer_rnn`): its
    weight matrices live as :class:`IntegerMatrix` codes in ``weights_q``, its biases as float32 parameters.

    ``nn.RNNBase`` computes with its ``_flat_weights`` list, not with the attributes (as ``FakeQuantizedRNN`` in
    ``callbacks/quantization.py`` uses too): each call dequantizes the matrices into that list, runs torch's own
    kernel (every RNN type, direction and projection it supports) and drops them, so the float matrices exist only
    for the duration of one call.
    """

    weights_q: nn.ModuleDict

    def forward(self, input: Any, hx: Any = None) -> Any:
        self._update_flat_weights()  # the biases as loaded; the weight entries are None (no such attribute)
        flat = self._flat_weights
        self._flat_weights = [
            self.weights_q[n].dequantize() if n in self.weights_q else w for n, w in zip(self._flat_weights_names, flat)
        ]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = flat


@functools.cache
def _integer_class(cls: type) -> type:
    return type(f"Integer{cls.__name__}", (IntegerRNN, cls), {})


def integer_rnn(module: nn.RNNBase, weights: dict[str, IntegerMatrix]) -> nn.RNNBase:
    """``module`` turned in place into its integer class: its float weight parameters removed, ``weights`` kept."""
    for name in weights:
        del module._parameters[name]
    module.__class__ = _integer_class(type(module))
    module.weights_q = nn.ModuleDict(weights)
    return module


def resident_bytes(network: nn.Module) -> dict[str, int]:
    """Bytes of the network's weights in memory, by top-level module, each storage counted once (a tied matrix
    under the module that holds it first). ``total`` is the sum."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for name, tensor in [*network.named_parameters(remove_duplicate=False), *network.named_buffers(remove_duplicate=False)]:
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        top = name.split(".")[0]
        out[top] = out.get(top, 0) + tensor.untyped_storage().nbytes()
    out["total"] = sum(out.values())
    return out


def integer_modules(
    template: nn.Module, matrices: dict[str, IntegerMatrix], floats: dict[str, torch.Tensor], ties: dict[str, str]
) -> set[str]:
    """Replace, in ``template`` (a network built on the meta device), every Embedding / EmbeddingBag / Linear /
    RNNBase whose weights are all in ``matrices`` by its integer module; returns the tensor names they took over.
    ``floats`` gives the biases. The caller refuses the matrices of other modules (it names them)."""
    taken: set[str] = set()
    for name, module in list(template.named_modules()):
        prefix = f"{name}." if name else ""

        def matrix(attr: str, prefix: str = prefix) -> Optional[IntegerMatrix]:
            key = prefix + attr
            return matrices.get(ties.get(key, key))

        replacement: Optional[nn.Module] = None
        if type(module) in (nn.Embedding, nn.EmbeddingBag, nn.Linear) and matrix("weight") is not None:
            if type(module) is nn.Embedding and (module.max_norm is not None or module.padding_idx is not None):
                continue  # lookups that renormalize or pin a row: left in float
            if type(module) is nn.Embedding:
                replacement = IntegerEmbedding(matrix("weight"))
            elif type(module) is nn.EmbeddingBag:
                if module.max_norm is not None or module.padding_idx is not None or module.mode == "max":
                    continue
                replacement = IntegerEmbeddingBag(matrix("weight"), module)
            else:
                bias = floats.get(ties.get(prefix + "bias", prefix + "bias")) if module.bias is not None else None
                replacement = IntegerLinear(matrix("weight"), bias)
                taken.add(prefix + "bias")
            taken.add(prefix + "weight")
        elif isinstance(module, nn.RNNBase):
            weight_names = [n for n, _ in module.named_parameters() if n.startswith("weight")]
            if not weight_names or any(matrix(n) is None for n in weight_names):
                continue
            weights = {n: matrix(n) for n in weight_names}
            if type(module) is nn.LSTM and module.batch_first and not module.bidirectional and not module.proj_size:
                biases = {n: floats[prefix + n] for n, _ in module.named_parameters() if n.startswith("bias")}
                replacement = IntegerLSTM(module, weights, biases)
                taken.update(prefix + n for n, _ in module.named_parameters())
            else:  # any other recurrent layer: torch's kernel on weights dequantized per call; biases loaded as float
                replacement = integer_rnn(module, weights)
                taken.update(prefix + n for n in weight_names)
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(template.get_submodule(parent_name) if parent_name else template, child, replacement)
    return taken
