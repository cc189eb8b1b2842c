"""One int8/int4 matrix resident as integer codes + float32 scales, and its products (``inference.py``'s modules
are built on it): a loaded integer export never holds a float copy of a whole weight.

* :class:`IntegerMatrix` holds one quantized matrix as the export wrote it: int8 codes with one float32 scale per
  row, or int4 codes packed two per byte (row by row) with one scale per ``group_size`` inputs. A tied
  embedding/decoder shares one.
* Products ``x @ weight.T`` unpack ``block_elements`` weights at a time (1 MiB of float32: 1,310 rows at width 200)
  into one scratch buffer per thread, and multiply each block with float32 matmul straight into its columns of the
  output: the float weight that exists at any moment is one block, and it stays in the CPU's cache between being
  written and being read, so the product reads 1 byte a weight (int8) or half of one (int4) from memory instead of
  float32's 4. A block is unpacked unscaled; int8's one scale a row then multiplies the output once at the end (a
  multiplication of the block broadcast over rows costs more than the product itself), int4's scales, one per group
  of inputs, multiply the block. Where the float32 weight no longer fits in the cache (a real vocabulary's decoder)
  reading a quarter of the bytes wins; where it fits, the unpacking costs more than it saves (benchmarks/inference.py
  measures both; the README has the figures).
  int4 unpacks its nibbles with integer shifts (the high one by an arithmetic shift of the signed byte, the low one
  shifted up first) and multiplies the even and the odd inputs as two half-width products, so that no index table
  or integer widening is needed; groups of an odd size take a slower path that unpacks through a 256-entry table.
  torch's weight-only int8 kernel (``torch._weight_int8pack_mm``, the one torchao's CPU int8 layout calls) was
  slower than this path on the CPUs tried: ``int8_kernel_max_rows`` sends products of that many rows or fewer to
  it, on CPUs where it wins.
  torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) is not used: it takes only groups of 32, 64, 128 or 256
  inputs and its own packed layout, which an embedding lookup of a tied matrix cannot read.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IntegerMatrix"]


def _int4_table() -> torch.Tensor:
    """Byte -> its two signed 4-bit codes as float32 (low nibble first, as ``format.pack_int4`` packs)."""
    byte = torch.arange(256)
    nibbles = torch.stack([byte & 0xF, byte >> 4], dim=1)
    return ((nibbles ^ 8) - 8).float()


_INT4 = _int4_table()
_SCRATCH = threading.local()
_FOURS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _four(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The shift count 4 as a tensor of ``dtype``, made once: a Python 4 is wrapped into a new tensor on every shift,
    three times a block."""
    four = _FOURS.get((device, dtype))
    if four is None:
        four = _FOURS[device, dtype] = torch.tensor(4, dtype=dtype, device=device)
    return four


def _scratch(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A buffer of ``numel`` elements, one per thread, device and dtype, reused by every blockwise product: the float
    weights in memory at any moment are one block (1 MiB), whatever the size of the network."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get((device, dtype))
    # One made under torch.inference_mode (Lightning's test and predict) cannot be written outside it: a new one then.
    stale = buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled()
    if buffer is None or stale or buffer.numel() < numel:
        buffer = buffers[device, dtype] = torch.empty(numel, device=device, dtype=dtype)
    return buffer[:numel]


class IntegerMatrix(nn.Module):
    """A ``(rows, cols)`` weight kept as integer codes + float32 scales (``scale`` is ``(rows, blocks)``).

    ``codes`` is int8 ``(rows, cols)`` for 8 bits; for 4 bits ``packed`` is uint8 ``(rows, ceil(cols / 2))``, two codes
    per byte, each row starting on a byte. ``weight == codes * scale`` (the scale repeated over each block of inputs).
    """

    block_elements = 2**18  # weights dequantized at a time by a product: 1 MiB of float32, small enough for the cache
    int8_kernel_max_rows = 0  # products of this many input rows or fewer go to torch's int8 kernel (slower here)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int, width: Optional[int] = None) -> None:
        """``codes``: int8 ``(rows, cols)``; or, for 4 bits, the packed uint8 ``(rows, ceil(width / 2))`` bytes
        themselves with ``width`` (a dense int4 export of even width stores exactly these: loading takes them as
        they are, without an unpacked copy)."""
        super().__init__()
        packed = bits == 4 and width is not None and codes.dtype == torch.uint8
        if bits not in (4, 8) or codes.dim() != 2 or not (packed or codes.dtype == torch.int8):
            raise ValueError("IntegerMatrix takes 2-D int8 codes (or int4's packed uint8 bytes and their width) and bits 4 or 8")
        rows, cols = (codes.shape[0], width) if packed else codes.shape
        if scale.shape[0] != rows or cols % scale.shape[1] or (packed and codes.shape[1] != (cols + 1) // 2):
            raise ValueError(f"scales {tuple(scale.shape)} do not fit codes {tuple(codes.shape)}")
        self.bits, self.shape, self.block = bits, (rows, cols), cols // scale.shape[1]
        self.register_buffer("scale", scale.float().contiguous())
        if bits == 8:
            self.register_buffer("codes", codes.contiguous())
        elif packed:
            self.register_buffer("packed", codes.contiguous())
        else:
            nibbles = (codes.to(torch.uint8) & 0xF).reshape(rows, cols)
            if cols % 2:
                nibbles = F.pad(nibbles, (0, 1))
            self.register_buffer("packed", (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous())
        # The kernel wants one scale per row; a view of ``scale`` (no copy) when int8 keeps one block per row.
        self._kernel = bits == 8 and self.scale.shape[1] == 1 and hasattr(torch, "_weight_int8pack_mm")
        # int4 by nibbles (two half-width products) needs each byte's two codes in one group: an even group size
        # (the width, a multiple of it, is then even too and no byte is padding).
        self._by_nibbles = bits == 4 and self.block % 2 == 0

    def extra_repr(self) -> str:
        layout = "per output row" if self.bits == 8 else f"groups of {self.block}"
        return f"{self.shape[0]}x{self.shape[1]}, int{self.bits} {layout}"

    # --- dequantizing a few rows --------------------------------------------------------------------------
    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 rows ``index`` (any shape) -> ``(*index.shape, cols)``: an embedding lookup."""
        flat = index.reshape(-1).long()
        codes = self._codes_as_float(flat).reshape(flat.numel(), -1, self.block)
        return codes.mul_(self.scale[flat].unsqueeze(-1)).reshape(*index.shape, self.shape[1])

    def _codes_as_float(self, rows: torch.Tensor | slice) -> torch.Tensor:
        if self.bits == 8:
            return self.codes[rows].float()
        packed = self.packed[rows]
        table = _INT4.to(packed.device)
        return F.embedding(packed.int(), table).reshape(packed.shape[0], -1)[:, : self.shape[1]]

    def dequantize(self) -> torch.Tensor:
        """The whole float32 weight: only ``IntegerRNN`` builds it in a forward pass, for the duration of one call."""
        return self.rows(torch.arange(self.shape[0], device=self.scale.device))

    # --- the product x @ weight.T -------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        lead, width = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, width).float().contiguous()
        if self._kernel and x2.device.type == "cpu" and x2.shape[0] <= self.int8_kernel_max_rows:
            out = torch._weight_int8pack_mm(x2, self.codes, self.scale.view(-1))
        elif torch.is_grad_enabled() and x2.requires_grad:
            # Gradients flow to the input (a fork training a float module on top): autograd keeps every block for the
            # backward pass, so each is a fresh tensor, not the scratch buffer, and products are not written in place.
            blocks = self._blocks()
            out = torch.cat([x2 @ self.rows(torch.arange(r.start, r.stop, device=x2.device)).T for r in blocks], dim=1)
        else:
            out = self._product(x2)
        if bias is not None:
            out += bias
        return out.reshape(*lead, self.shape[0])

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` block by block. A block's codes are unpacked to float32 unscaled (int4 with an even group
        size: as two halves, the codes of the even inputs and of the odd ones, each multiplied by its half of the
        inputs). One scale a row multiplies the output, once at the end, instead of every block (the int8 product at
        one input row: 0.45x float32's time instead of 0.93x); scales by group multiply the block in place."""
        groups = self.scale.shape[1]
        out = x.new_empty(x.shape[0], self.shape[0])
        xs = [x[:, 0::2].contiguous(), x[:, 1::2].contiguous()] if self._by_nibbles else [x]
        for rows in self._blocks():
            parts = self._unscaled(rows)  # (len(xs), rows in the block, width of a part)
            if groups > 1:
                parts.view(len(xs), parts.shape[1], groups, -1).mul_(self.scale[rows].view(1, -1, groups, 1))
            torch.mm(xs[0], parts[0].T, out=out[:, rows])
            if len(xs) == 2:
                out[:, rows].addmm_(xs[1], parts[1].T)
        if groups == 1:
            out *= self.scale.T
        return out

    def dequantized_block(self) -> Optional[torch.Tensor]:
        """The whole float32 weight when it fits in one block, else None: the LSTM's recurrent matrix, dequantized
        once a window instead of once a step. In this thread's scratch buffer (int8: valid until its next integer
        product) or, for int4 by nibbles, a new tensor with the inputs back in order."""
        if self.shape[0] * self.shape[1] > self.block_elements:
            return None
        parts = self._unscaled(slice(0, self.shape[0]))
        groups = self.scale.shape[1]
        parts.view(parts.shape[0], self.shape[0], groups, -1).mul_(self.scale.view(1, -1, groups, 1))
        return parts.permute(1, 2, 0).reshape(self.shape)

    def _blocks(self) -> list[slice]:
        step = max(1, self.block_elements // self.shape[1])
        return [slice(start, min(start + step, self.shape[0])) for start in range(0, self.shape[0], step)]

    def _unscaled(self, rows: slice) -> torch.Tensor:
        """Rows ``rows`` as float32 codes, not yet scaled, in this thread's scratch buffer: ``(1, count, cols)``, or
        for int4 with an even group size ``(2, count, cols / 2)``, the low nibbles (inputs 0, 2, ...) then the high
        ones (1, 3, ...). A signed byte shifted right by 4 is its high code; shifted left by 4 first, its low one: no
        index table, no integer widening."""
        count, cols = rows.stop - rows.start, self.shape[1]
        block = _scratch(count * cols, self.scale.device, torch.float32)
        if self.bits == 8:
            return block.view(1, count, cols).copy_(self.codes[rows])
        if not self._by_nibbles:  # odd group sizes: through the byte table
            return block.view(1, count, cols).copy_(self._codes_as_float(rows))
        half, packed = cols // 2, self.packed[rows]
        codes = _scratch(count * cols, self.scale.device, torch.int8).view(2, count, half)
        four = _four(packed.device, torch.int8)
        torch.bitwise_left_shift(packed, _four(packed.device, torch.uint8), out=codes[0].view(torch.uint8))
        codes[0].bitwise_right_shift_(four)
        torch.bitwise_right_shift(packed.view(torch.int8), four, out=codes[1])
        return block.view(2, count, half).copy_(codes)
