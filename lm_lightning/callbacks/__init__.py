"""Callbacks: one file per feature, each usable as ``--trainer.callbacks+=ClassName``; the export step is ``--export.*``.

The memory strategies subclass :class:`MemoryStrategy` (``strategy.py``: the contract, written once); the others are
steps of a run (export, console line, throughput, generation writer) or a check (precision guard). The memory
monitor lives with the memory measuring and planning it shares code with: ``lm_lightning/memory/monitor.py``.
"""

from lm_lightning.callbacks.accumulation import MicroBatchAccumulation
from lm_lightning.callbacks.adaptive_input import AdaptiveInput
from lm_lightning.callbacks.adaptive_softmax import AdaptiveSoftmax
from lm_lightning.callbacks.allocator import ReturnFreedMemory
from lm_lightning.callbacks.chunked_loss import ChunkedLoss
from lm_lightning.callbacks.console import ValidationLine
from lm_lightning.callbacks.export import Export
from lm_lightning.callbacks.fast_allocator import FastAllocator
from lm_lightning.callbacks.generation_writer import GenerationWriter
from lm_lightning.callbacks.precision import PrecisionGuard
from lm_lightning.callbacks.pruning import MagnitudePruning
from lm_lightning.callbacks.quantization import QuantizationAwareFinishing
from lm_lightning.callbacks.recompute import Recomputation
from lm_lightning.callbacks.sparse_gradients import SparseEmbeddingGradients
from lm_lightning.callbacks.strategy import MemoryStrategy, memory_strategies
from lm_lightning.callbacks.throughput import TokenThroughput

__all__ = [
    "AdaptiveInput",
    "AdaptiveSoftmax",
    "ChunkedLoss",
    "Export",
    "FastAllocator",
    "GenerationWriter",
    "MagnitudePruning",
    "MemoryStrategy",
    "MicroBatchAccumulation",
    "PrecisionGuard",
    "QuantizationAwareFinishing",
    "Recomputation",
    "ReturnFreedMemory",
    "SparseEmbeddingGradients",
    "TokenThroughput",
    "ValidationLine",
    "memory_strategies",
]
