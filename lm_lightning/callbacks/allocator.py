"""Give large freed buffers back to the OS at once (glibc's mmap threshold), so the process's resident size tracks the
bytes in use.

glibc serves an allocation above its *mmap threshold* with its own ``mmap`` and unmaps it when freed. The threshold
starts at 128 KiB and rises to the size of every such block freed, up to 32 MiB: after the first training step nearly
every activation, gradient and temporary comes from the heap, whose freed space stays resident and fragments, so the
peak RSS grows over the run past what ``estimate`` predicts from the bytes in use. With the threshold fixed the peak
stays near the prediction, for some tokens/s, because each large buffer is mapped (and zeroed) anew every step (the
docs/memory.md's lean-preset section has the figures). A trade for a process that must stay under a limit, not a default.

Setting the threshold disables glibc's own adjustment for the rest of the process (its documented behaviour), the
same as the ``MALLOC_MMAP_THRESHOLD_`` environment variable would; this callback does it when ``fit`` starts, so a
preset can turn it on. On a C library without ``mallopt`` (macOS, musl, Windows) it warns once and does nothing.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from lm_lightning.callbacks.strategy import MemoryStrategy
from lm_lightning.errors import LMInputError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
# The ceiling of glibc's own adaptive threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit): a fixed threshold above it keeps
# more in the heap than glibc ever would, the opposite of this callback's purpose (FastAllocator's, callbacks/fast_allocator.py).
MAX_MMAP_THRESHOLD = 32 * 2**20


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (AttributeError, OSError):
        return None
    return libc


class ReturnFreedMemory(MemoryStrategy):
    """Large freed buffers go straight back to the OS (glibc's mmap threshold fixed), so peak RSS stays near the
    bytes in use and near ``estimate``'s prediction; costs tokens/s (each large buffer is mapped anew every step).

    Args:
        mmap_threshold: Allocations of at least this many bytes get their own mapping, returned to the OS when freed
            (glibc's default starts at 128 KiB and rises to 32 MiB as blocks are freed; fixing it stops the rise).
            Between 4096 and 33554432.
    """

    def __init__(self, mmap_threshold: int = 4 * 2**20) -> None:
        if not 4096 <= mmap_threshold <= MAX_MMAP_THRESHOLD:
            raise LMInputError(
                f"ReturnFreedMemory mmap_threshold must be between 4096 and {MAX_MMAP_THRESHOLD} bytes, got "
                f"{mmap_threshold}: give e.g. 4194304 (4 MiB)."
            )
        self.mmap_threshold = mmap_threshold
        self.applied = False

    name = "allocator"

    def hparams(self) -> dict[str, int]:
        return {"mmap_threshold": self.mmap_threshold}

    def label(self) -> str:
        return "freed memory returned"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        libc = _glibc()
        if libc is None or libc.mallopt(M_MMAP_THRESHOLD, self.mmap_threshold) != 1:
            rank_zero_warn("ReturnFreedMemory does nothing here: this C library has no glibc mallopt (Linux only).")
            return
        # glibc maps a block only when no freed space in the heap fits it: the heap that imports and data loading grew
        # would go on serving (and keeping) large buffers. Free space at its top above the threshold goes back to the
        # OS from now on, and what is free now goes back at once.
        libc.mallopt(M_TRIM_THRESHOLD, self.mmap_threshold)
        libc.malloc_trim(0)
        self.applied = True
