"""An ONNX Runtime session for an export: the one place that sets how the graph is run.

All of ONNX Runtime's graph optimizations are on: its constant folding is what dequantizes a recurrent layer's int8 /
int4 weights once, at load (``export/onnx_quantize.py``). One thread unless told otherwise: generation runs one
token at a time, where more threads add synchronisation and little speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from typing import Optional

import onnxruntime as ort


def open_session(path: str | Path, threads: Optional[int] = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its shape-inference notes are not for a user
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    _return_freed_memory()
    return session


def _return_freed_memory() -> None:
    """Hand the heap memory freed while the graph was read and optimized (the file's bytes, the parsed model) back to
    the OS: glibc keeps it otherwise, 7 MiB of a WikiText-2 int8 export's process. Elsewhere (musl, macOS) a no-op."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
