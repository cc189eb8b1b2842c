"""FastAllocator (callbacks/fast_allocator.py): freed buffers kept for the next step; the same results; not together
with ReturnFreedMemory; glibc's setting put back when fit ends."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lm_lightning.callbacks.fast_allocator import FastAllocator
from lm_lightning.cli import main
from lm_lightning.errors import LMInputError
from lm_lightning.memory.measure import _MALLINFO2

ROOT = Path(__file__).resolve().parents[1]
needs_glibc = pytest.mark.skipif(_MALLINFO2 is None, reason="needs glibc (Linux)")

# In a process of its own: the setting lasts for the rest of the process, and the test session's allocator stays as is.
PROBE = """
import torch
from lm_lightning.callbacks.fast_allocator import FastAllocator
from lm_lightning.memory.measure import _MALLINFO2

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def mapped_while_alive():  # bytes glibc mapped for a 64 MiB tensor's block (0: it came from the heap)
    before = _MALLINFO2().hblkhd
    tensor = torch.ones(16 * 2**20)
    mapped = _MALLINFO2().hblkhd - before
    del tensor
    return mapped

default = mapped_while_alive()  # above glibc's 32 MiB ceiling: always mapped by default, zero-filled by the kernel
callback = FastAllocator()
callback.setup(None, None, "fit")
kept = mapped_while_alive()
free_in_heap, rss_kept = _MALLINFO2().fordblks, resident()  # the freed block stayed in the process
callback.teardown(None, None, "fit")
print(default, kept, free_in_heap, mapped_while_alive(), rss_kept - resident(), callback.applied)
"""


@needs_glibc
def test_large_buffers_come_from_the_heap_and_stay_until_fit_ends():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    default, kept, free_in_heap, after, handed_back, applied = out.stdout.split()
    mib64 = 64 * 2**20
    assert int(default) >= mib64 and int(kept) == 0 and int(free_in_heap) >= mib64
    assert int(after) >= mib64 and applied == "False"  # glibc's usual behaviour again
    assert int(handed_back) >= 60 * 2**20  # and the kept heap went back to the OS (malloc_trim)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mmap_threshold": 2**20}, r"^FastAllocator mmap_threshold must be between 33554432 \(32 MiB, .*\) and 2147483647 bytes, got 1048576: give e\.g\. 1073741824"),
        ({"mmap_threshold": 2**31}, r"^FastAllocator mmap_threshold must be between .* got 2147483648"),
        ({"mmap_threshold": 2**30, "trim_threshold": 2**29}, r"^FastAllocator trim_threshold must be between mmap_threshold \(1073741824\)"),
    ],
)
def test_a_threshold_mallopt_cannot_take_is_one_sentence(kwargs, message):
    with pytest.raises(LMInputError, match=message):
        FastAllocator(**kwargs)


def test_with_return_freed_memory_it_is_one_sentence_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    args = ["fit", "-c", "configs/presets/debug.yaml", "-c", "configs/memory/lean.yaml", "-c", "configs/memory/fast_allocator.yaml"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: FastAllocator and ReturnFreedMemory set glibc's allocator opposite ways") and "keep one" in last
    assert not (tmp_path / "lightning_logs").exists()


@needs_glibc
def test_the_same_losses_with_and_without_it(tmp_path):
    """Parity: the allocator decides where buffers live, never what is computed."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    lines = []
    for extra in ([], ["-c", "configs/memory/fast_allocator.yaml"]):
        args = [sys.executable, "-m", "lm_lightning", "fit", "-c", "configs/presets/debug.yaml", *extra]
        args += ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.version", str(len(lines))]
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        lines.append(re.search(r"train loss \S+ · val ppl \S+", done.stdout + done.stderr).group(0))
    assert lines[0] == lines[1]
