"""What a CUDA prediction is made of: the run it describes (:class:`GpuRun`), the constants it assumes, and the table
of parts it prints (:class:`CudaPlan`). ``cuda_steps.py`` computes one by replaying a fit's first steps through the
caching allocator's rules (``cuda_allocator.py``); ``cuda_estimate.py`` reads a run's :class:`GpuRun` from its
objects and answers ``estimate`` and the memory monitor. Torch-free: a CPU without CUDA computes the same figures.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from lm_lightning.memory.available import human_bytes

MiB = 2**20
# The CUDA context, cuBLAS/cuDNN handles and loaded kernels: device memory outside the caching allocator. An
# assumption: 300-600 MiB on recent GPUs with CUDA's lazy module loading (torch's default).
CUDA_CONTEXT_BYTES = 500 * MiB
# No cuDNN dropout state: networks/lstm.py's StackedLSTM calls cuDNN one layer at a time with dropout 0.0 (F.dropout
# between the layers), and get_dropout_state in aten/src/ATen/native/cudnn/RNN.cpp creates that state only for a call
# that trains with dropout_p > 0.
# What one layer's cuDNN call keeps for backward in its reserve space, per stream and step, in hidden_dim values: the
# four gates, the cell and the output (an assumption: cuDNN documents no formula). No term for dropout: no call drops.
CUDNN_RESERVE_VALUES = 6
# precision -> (bytes per parameter, bytes per activation, autocast): torch's autocast runs the LSTM and the decoder in
# half; evaluation.nll computes the log-softmax in float32 whatever the precision.
PRECISIONS = {
    "32-true": (4, 4, False),
    "16-mixed": (4, 2, True),
    "bf16-mixed": (4, 2, True),
    "16-true": (2, 2, False),
    "bf16-true": (2, 2, False),
}


def cublas_workspace_bytes(major: Optional[int] = None) -> int:
    """torch's cuBLAS workspace (``CublasHandlePool.cpp``): ``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE_KiB:COUNT`` pairs) when
    set, else 32 MiB on compute capability 9 and newer (Hopper; cuBLAS's recommendation) and 4096 KiB x 2 + 16 KiB x 8
    before. ``major`` None (no GPU here): a Hopper-class GPU is assumed."""
    pairs = re.findall(r":(\d+):(\d+)", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""))
    if pairs:
        return sum(int(size) * 1024 * int(count) for size, count in pairs)
    return 32 * MiB if major is None or major >= 9 else 4096 * 1024 * 2 + 16 * 1024 * 8


@dataclass(frozen=True)
class GpuRun:
    """What the arithmetic needs of a run: the network, one window, precision, optimizer, the two levers."""

    vocab_size: int
    embedding_dim: int
    hidden_dim: int
    num_layers: int
    tie_weights: bool
    dropout: float
    batch_size: int  # streams of a window (the effective batch, per device)
    bptt: int
    precision: str = "32-true"
    optimizer: str = "AdamW"
    optimizer_states: int = 2  # parameter-sized tensors of state per parameter: AdamW 2, SGD with momentum 1, SGD 0
    step_temporaries: int = 1  # parameter-sized temporaries of one foreach update (AdamW's sqrt; SGD's weight decay)
    foreach: bool = True  # torch's default on CUDA; False: one parameter's temporaries at a time (fused: none at all)
    micro_batch_size: int = 0  # MicroBatchAccumulation's streams per pass (0: whole windows)
    loss_chunk_size: int = 0  # ChunkedLoss's tokens per chunk (0: the full logits)
    windows_per_step: int = 1  # Lightning's accumulate_grad_batches without micro-batches
    world_size: int = 1
    cublas_workspace: int = field(default_factory=cublas_workspace_bytes)

    @property
    def streams(self) -> int:
        return self.micro_batch_size or self.batch_size

    def lstm_tensors(self) -> list[tuple[str, int]]:
        """``nn.LSTM``'s parameters in order, (name, values)."""
        h, tensors = self.hidden_dim, []
        for layer in range(self.num_layers):
            inputs = self.embedding_dim if layer == 0 else h
            tensors += [
                (f"weight_ih_l{layer}", 4 * h * inputs),
                (f"weight_hh_l{layer}", 4 * h * h),
                (f"bias_ih_l{layer}", 4 * h),
                (f"bias_hh_l{layer}", 4 * h),
            ]
        return tensors

    def lstm_layers(self) -> list[list[tuple[str, int]]]:
        """``lstm_tensors`` by layer: on CUDA, StackedLSTM keeps each layer's in a cuDNN buffer of its own."""
        tensors = self.lstm_tensors()
        return [tensors[4 * layer : 4 * layer + 4] for layer in range(self.num_layers)]

    def parameters(self) -> list[tuple[str, int]]:
        """The system's parameters in ``model.parameters()`` order (a tied decoder weight once, as the embedding)."""
        decoder = [] if self.tie_weights else [("decoder.weight", self.vocab_size * self.hidden_dim)]
        lstm = [(f"lstm.{name}", n) for name, n in self.lstm_tensors()]
        return [("embedding.weight", self.vocab_size * self.embedding_dim), *lstm, *decoder, ("decoder.bias", self.vocab_size)]


class Part:
    """The parts of the table, in its order (``ORDER``): what each allocation of the replay is counted as."""

    PARAMS, GRADS, STATE, STEP = "parameters", "gradients", "optimizer state", "optimizer step temporaries"
    COPIES = "autocast's half copies of the weights"
    SAVED = "saved activations (embedding, LSTM layers, masks, decoder input)"
    BETWEEN = "dropout between LSTM layers (1-byte masks, outputs)"
    RESERVE = "cuDNN reserve space, one per LSTM layer (assumed rule)"
    LOGITS = "logits, log-softmax and their gradients"
    TEMPS = "other temporaries (casts, copies, backward)"
    CARRY = "batch ids and carried hidden state"
    CUBLAS = "cuBLAS workspaces (forward and backward threads)"
    DDP = "DDP gradient buckets (one copy of the gradients)"
    ORDER = (PARAMS, GRADS, STATE, STEP, COPIES, SAVED, BETWEEN, RESERVE, LOGITS, TEMPS, CARRY, CUBLAS, DDP)


@dataclass
class CudaPlan:
    """A prediction for a GPU. ``parts``: the blocks alive when allocated memory peaks, by part (they sum to
    ``allocated``); ``reserved``: the caching allocator's segments then; ``fixed``: what no lever changes (weights,
    gradients, optimizer state, workspaces, the context)."""

    run: GpuRun
    parts: dict[str, int]
    allocated: int
    reserved: int
    peak_at: str
    fixed: int
    host_rss: int = 0
    context: int = CUDA_CONTEXT_BYTES
    strategies: str = "none"
    device: str = ""  # the GPU's name where CUDA is here; "" for a prediction made without one

    @property
    def total(self) -> int:
        """What the process takes from the GPU: the allocator's segments and the CUDA context."""
        return self.reserved + self.context

    @property
    def peak(self) -> int:
        """The figure MemoryMonitor measures as its peak: reserved memory (``torch.cuda.max_memory_reserved``)."""
        return self.reserved

    def table(self) -> str:
        run = self.run
        where = (
            f"{self.device}, arithmetic: nothing ran on it"
            if self.device
            else "a CUDA GPU (none here): arithmetic, nothing ran on one"
        )
        rows = [(f"  {part}", size) for part, size in self.parts.items() if size]
        rows += [
            ("peak allocated (torch.cuda.max_memory_allocated)", self.allocated),
            ("reserved by the caching allocator (max_memory_reserved)", self.reserved),
            ("  fragmentation (reserved - allocated)", self.reserved - self.allocated),
            ("CUDA context (assumed; outside the allocator)", self.context),
            ("host RSS (process baseline, as on CPU)", self.host_rss),
        ]
        width = max(len(name) for name, _ in rows)
        window = f"{run.streams} stream{'s' * (run.streams > 1)} x {run.bptt} steps"
        header = (
            f"Predicted GPU memory: {human_bytes(self.total)} = reserved {human_bytes(self.reserved)} + CUDA context "
            f"{human_bytes(self.context)} (precision {run.precision}, {window}, {run.optimizer}; a prediction for {where})"
        )
        lines = [f"  {name:<{width}}  {human_bytes(value):>10}" for name, value in rows]
        return "\n".join(
            [header, f"  at the allocated peak ({self.peak_at}):", *lines, f"  with the memory strategies: {self.strategies}"]
        )
