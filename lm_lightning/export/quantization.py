"""The quantization rule, one for training and export: symmetric, weight-only integer codes with float32 scales.

Jacob et al. 2018 (arXiv:1712.05877): int8 keeps one scale per output row; int4 one scale per ``group_size`` inputs
(as GPTQ/AWQ-style int4 checkpoints do). Scales and codes come from torchao's public primitives
(``choose_qparams_affine`` / ``quantize_affine``), bit-identical to ``torchao.quantization.qat.IntxFakeQuantizer``
(a test holds them equal). Quantization-aware finishing (``callbacks/quantization.py``) runs :func:`fake_quantize`
and the export (``export/writer.py``) stores :func:`quantize_weight`'s codes, so a loaded export reproduces the
fake-quantized weights bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch

from lm_lightning.errors import LMInputError


def check_quantization(bits: Optional[int], group_size: int) -> None:
    if bits not in (None, 4, 8):
        raise LMInputError(f"bits must be 8 (int8 per output channel) or 4 (int4 groups), got {bits}.")
    if bits == 4 and (not isinstance(group_size, int) or group_size < 2):
        raise LMInputError(f"group_size must be an integer of at least 2, got {group_size}.")


def block_width(weight_shape: torch.Size | tuple, bits: int, group_size: int, name: str = "weight") -> int:
    """Inputs sharing one scale: the whole row for int8, ``group_size`` for int4 (which must divide the row); a row
    narrower than ``group_size`` (an adaptive layer's rare-word matrix) is one group."""
    width = int(weight_shape[-1])
    if bits == 8 or width < group_size:
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
    # Imported here, not at module level: torchao costs 13 MB of resident memory that a float32 run never needs.
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    if weight.shape[-1] == 1:  # torchao cannot quantize (rows, 1) (a reshape fails); a zero column changes no scale
        codes, scale = quantize_weight(torch.cat([weight, torch.zeros_like(weight)], -1), bits, group_size)
        return codes[:, :1].contiguous(), scale
    block = (1, block_width(weight.shape, bits, group_size))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale, zero_point = choose_qparams_affine(
        weight, MappingType.SYMMETRIC, block, torch.int8, qmin, qmax, scale_dtype=torch.float32, zero_point_dtype=torch.int8
    )
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
