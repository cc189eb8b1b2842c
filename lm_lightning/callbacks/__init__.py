"""Callbacks: one file per feature, each usable as ``--trainer.callbacks+=ClassName``."""

from lm_lightning.callbacks.generation_writer import GenerationWriter
from lm_lightning.callbacks.throughput import TokenThroughput

__all__ = ["GenerationWriter", "TokenThroughput"]
