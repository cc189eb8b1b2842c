"""ReturnFreedMemory (callbacks/allocator.py): glibc's mmap threshold fixed, so large freed buffers leave the process."""

import subprocess
import sys

import pytest

from lm_lightning.callbacks.allocator import ReturnFreedMemory
from lm_lightning.errors import LMInputError
from lm_lightning.memory.measure import _MALLINFO2

# In a process of its own: the setting lasts for the rest of the process, and the test session's allocator stays as is.
PROBE = """
import torch
from lm_lightning.callbacks.allocator import ReturnFreedMemory
from lm_lightning.memory.measure import _MALLINFO2

def mapped_while_alive():  # bytes glibc mapped for the block of an 8 MiB tensor (0: it came from the heap)
    before = _MALLINFO2().hblkhd
    tensor = torch.ones(2 * 2**20)
    mapped = _MALLINFO2().hblkhd - before
    del tensor
    return mapped

mapped_while_alive()  # if glibc mapped this one, freeing it raised its threshold to 8 MiB (importing torch may have)
heap = mapped_while_alive()  # so the same size now comes from the heap, and stays resident when freed
callback = ReturnFreedMemory(mmap_threshold=2**20)
callback.setup(None, None, "fit")
print(heap, mapped_while_alive(), mapped_while_alive(), callback.applied)
"""


@pytest.mark.skipif(_MALLINFO2 is None, reason="needs glibc (Linux)")
def test_large_buffers_are_mapped_and_returned_after_setup():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    heap, mapped, mapped_again, applied = out.stdout.split()
    eight_mib = 8 * 2**20
    assert int(heap) == 0  # glibc's own rule, which the callback changes
    assert int(mapped) >= eight_mib and int(mapped_again) >= eight_mib and applied == "True"


@pytest.mark.parametrize("threshold", [0, 4095, 32 * 2**20 + 1])
def test_a_threshold_glibc_would_refuse_is_one_sentence(threshold):
    with pytest.raises(LMInputError, match=rf"^ReturnFreedMemory mmap_threshold must be between 4096 and 33554432 bytes, got {threshold}: give e.g. 4194304"):
        ReturnFreedMemory(mmap_threshold=threshold)


@pytest.mark.skipif(_MALLINFO2 is None, reason="needs glibc (Linux)")
def test_the_largest_threshold_is_one_glibc_takes():
    code = "from lm_lightning.callbacks.allocator import *; c = ReturnFreedMemory(MAX_MMAP_THRESHOLD); c.setup(None, None, 'fit'); print(c.applied)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-1] == "True", out.stderr[-2000:]
