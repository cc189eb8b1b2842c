"""Callbacks: one file per feature, each usable as ``--trainer.callbacks+=ClassName``; the export step is ``--export.*``."""

from lm_lightning.callbacks.accumulation import MicroBatchAccumulation
from lm_lightning.callbacks.allocator import ReturnFreedMemory
from lm_lightning.callbacks.console import ValidationLine
from lm_lightning.callbacks.export import Export
from lm_lightning.callbacks.generation_writer import GenerationWriter
from lm_lightning.callbacks.memory_monitor import MemoryMonitor
from lm_lightning.callbacks.precision import PrecisionGuard
from lm_lightning.callbacks.pruning import MagnitudePruning
from lm_lightning.callbacks.quantization import QuantizationAwareFinishing
from lm_lightning.callbacks.throughput import TokenThroughput

__all__ = [
    "Export",
    "GenerationWriter",
    "MicroBatchAccumulation",
    "MagnitudePruning",
    "MemoryMonitor",
    "PrecisionGuard",
    "QuantizationAwareFinishing",
    "ReturnFreedMemory",
    "TokenThroughput",
    "ValidationLine",
]
