"""Measuring memory: the allocator's bytes in use, distinct tensor storages, saved activations, peak and resident sizes.

The ground floor under the memory monitor (``memory/monitor.py``), the estimate (``memory/estimate.py``) and the
HPARAMS row (``reports/hparams.py``): it imports nothing else from lm_lightning but its torch-free sibling
``available.py``, so each of them can use it without importing the others. What torch lacks and this adds: a CPU
count of allocated bytes (glibc's ``mallinfo2``), bytes per distinct storage (a view keeps its whole storage alive;
tied weights count once), and what autograd saves for backward.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from lm_lightning.memory.available import human_bytes  # noqa: F401  (its torch-free home; imported from here too)

try:
    import resource
except ImportError:  # Windows
    resource = None


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [
        (name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _mallinfo2() -> Optional[Callable[[], _MallInfo2]]:
    try:
        function = ctypes.CDLL(None).mallinfo2  # the C library this process runs on
    except (AttributeError, OSError):  # not glibc (macOS, musl, Windows) or glibc < 2.33
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _mallinfo2()


def allocated_bytes(device: torch.device) -> Optional[int]:
    """Bytes allocated and not yet freed: the CUDA caching allocator's count on GPU; on CPU glibc's count of heap bytes
    in use plus its mmapped chunks (every arena; a call costs ~2 us), which is where torch's CPU tensors live. ``None``
    where neither is available."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if device.type != "cpu" or _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def _plain_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensors that own memory: a wrapper subclass (torchao's 8-bit optimizer state, NF4 weights) is its parts."""
    if is_traceable_wrapper_subclass(tensor):
        for name in tensor.__tensor_flatten__()[0]:
            yield from _plain_tensors(getattr(tensor, name))
    elif tensor.layout == torch.sparse_coo:  # a sparse gradient (SparseEmbeddingGradients): its indices and values
        yield from (tensor._indices(), tensor._values())
    else:
        yield tensor


def _storages(tensors: Iterable[Any]) -> dict[tuple[str, int], int]:
    """``(device, address) -> nbytes`` of each distinct storage behind ``tensors`` (non-tensors are skipped)."""
    found: dict[tuple[str, int], int] = {}
    for leaf in tensors:
        if not isinstance(leaf, torch.Tensor):
            continue
        for tensor in _plain_tensors(leaf):
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts: count the tensor
                found[(str(tensor.device), -id(tensor))] = tensor.numel() * tensor.element_size()
                continue
            found[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return found


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors``: tied weights and views are counted once."""
    return sum(_storages(tensors).values())


_CPU_PEAK = 0


def peak_bytes(device: torch.device) -> int:
    """Peak memory: the CUDA caching allocator's ``max_memory_allocated``, else this process's peak resident set.

    On Linux the peak is ``VmHWM`` (/proc/self/status), not ``ru_maxrss``: a process started by a large one (a
    subprocess of a test session or notebook) inherits the parent's resident size into ``ru_maxrss`` at exec
    (measured: 870 MiB reported for a 543 MiB fit started from pytest); ``VmHWM`` belongs to this program alone."""
    global _CPU_PEAK
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    # The kernel records the high-water mark lazily: VmHWM reads max(recorded mark, resident now),
                    # and pages returned with madvise (glibc's trimming) do not update the mark first, so a read can
                    # come out a few pages below an earlier one (seen: 12 KiB). A peak only grows: keep the largest.
                    _CPU_PEAK = max(_CPU_PEAK, int(line.split()[1]) * 1024)  # kB
                    return _CPU_PEAK
    except (OSError, ValueError, IndexError):
        pass
    if resource is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # ru_maxrss is in bytes on macOS, KiB on Linux


class SavedTensorBytes:
    """Context manager: bytes of the storages autograd saves for backward inside the block, ``exclude`` aside.

    The pack hook records each saved tensor's storage and keeps a ``detach()``-ed alias instead of the tensor itself
    (keeping a saved *output* itself would make a reference cycle and delay its release to the garbage collector).
    Saved-tensor hooks switch off autograd's check for tensors modified in place after being saved, so the unpack
    hook repeats that check. The hooks are thread-local and also see tensors saved by other hooks' callers inside the
    block; tensors that a nested ``saved_tensors_hooks`` (e.g. activation checkpointing) packs itself are not seen.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = set(_storages(exclude))
        self.saved: dict[tuple[str, int], int] = {}
        self.num_packed = 0
        self._hooks: Optional[torch.autograd.graph.saved_tensors_hooks] = None

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())

    def _pack(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        self.num_packed += 1
        for key, nbytes in _storages([tensor]).items():
            if key not in self._exclude:
                self.saved[key] = nbytes
        return tensor.detach(), tensor._version

    @staticmethod
    def _unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
        tensor, version = packed
        if tensor._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"a {tuple(tensor.shape)} {tensor.dtype} tensor is at version {tensor._version}, expected {version}."
            )
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None

    @property
    def active(self) -> bool:
        return self._hooks is not None


def rss_bytes() -> int:
    """This process's resident set size now (Linux: /proc/self/statm)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # raises ImportError on Windows, where the module-level name is None

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakAllocated(TorchDispatchMode):
    """The allocator's bytes in use, sampled after every tensor operation run inside the block (backward's too: the
    autograd engine carries the mode into it); ``peak`` is the highest. Operation granularity: an operation's own
    scratch buffers, freed before it returns, are not seen."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def __enter__(self) -> PeakAllocated:
        self.peak = allocated_bytes(torch.device("cpu"))
        return super().__enter__() if self.enabled else self

    def __exit__(self, *exc: Any) -> None:
        self.peak = max(self.peak, allocated_bytes(torch.device("cpu")))
        if self.enabled:
            super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, allocated_bytes(torch.device("cpu")))
        return out


def peak_rss_mib() -> Optional[float]:
    """This process's peak resident memory (``VmHWM``) in MiB, or None where ``/proc`` does not say (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# The CUDA caching allocator's counters MemoryMonitor logs, in this order.
CUDA_COUNTERS = ("allocated", "reserved", "peak_allocated", "peak_reserved", "fragmentation")


def cuda_memory(device: torch.device) -> dict[str, int]:
    """The CUDA caching allocator's counters on ``device``, bytes: allocated and reserved now, their peaks since the
    last ``reset_peak_memory_stats``, and fragmentation -- reserved but not allocated: freed blocks the allocator keeps
    for reuse and the unused ends of split segments. The CUDA context is in none of them."""
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    peaks = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return dict(zip(CUDA_COUNTERS, (allocated, reserved, *peaks, reserved - allocated)))


def peak_memory_mib(trainer: Any) -> Optional[float]:
    """Peak training memory. On a GPU the caching allocator's peak *reserved* memory (reset when a memory monitor's fit
    starts): what the process took from the device -- allocated memory is inside it, and a run that runs out, runs out
    of reserved memory. Else a memory monitor's (``peak_bytes``) when one runs, else this process's peak RSS."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    for callback in trainer.callbacks:
        if getattr(callback, "peak_bytes", None) is not None:
            return callback.peak_bytes / 2**20
    return peak_rss_mib()
