"""PyTorch's CUDA caching allocator, as arithmetic: what a sequence of allocations and frees makes it count as
allocated (``torch.cuda.memory_allocated``) and hold as reserved (``torch.cuda.memory_reserved``), without a GPU.

The rules, from PyTorch's ``c10/cuda/CUDACachingAllocator.cpp`` (and ``c10/core/AllocatorConfig.h`` where the
constants now live), with the default settings (no ``PYTORCH_CUDA_ALLOC_CONF``: ``max_split_size`` unlimited, no
``roundup_power2_divisions``, no expandable segments):

* every request is rounded up to a multiple of 512 bytes (``kMinBlockSize``; ``round_size``);
* a rounded request of at most 1 MiB (``kSmallSize``) is served from the small pool, whose segments are 2 MiB
  (``kSmallBuffer``); a larger one from the large pool, whose new segment is 20 MiB for a request under 10 MiB
  (``kLargeBuffer``/``large_segment_size``, ``kMinLargeAlloc``) and the request rounded up to a multiple of 2 MiB
  otherwise (``kRoundLarge``; ``get_allocation_size``);
* a request takes the smallest cached free block of its pool that fits (best fit, then the lowest address:
  ``get_free_block``); none fits: a new segment (``cudaMalloc``);
* the block is split when what is left is at least 512 bytes in the small pool, more than 1 MiB in the large pool
  (``should_split``); unsplit, the whole block counts as allocated (``allocated_bytes`` adds ``block->size``);
* a freed block merges with free neighbours of its segment; segments are kept (reserved) until ``empty_cache`` or a
  failed ``cudaMalloc``, so reserved memory only grows during a fit.

What this leaves out: streams other than the current one (a fit here runs on one), CUDA graphs, and the retry that
frees cached segments when ``cudaMalloc`` fails (a run near the device's limit can reserve less than predicted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MIN_BLOCK = 512  # kMinBlockSize: every size is rounded up to this
SMALL_SIZE = 2**20  # kSmallSize: the largest request served from the small pool
SMALL_SEGMENT = 2 * 2**20  # kSmallBuffer: small requests are packed in 2 MiB segments
LARGE_SEGMENT = 20 * 2**20  # kLargeBuffer: requests between 1 and 10 MiB share 20 MiB segments
MIN_LARGE_ALLOC = 10 * 2**20  # kMinLargeAlloc: from this size on, a segment of its own
ROUND_LARGE = 2 * 2**20  # kRoundLarge: a segment of its own is rounded up to 2 MiB


def round_size(nbytes: int) -> int:
    """The block size a request of ``nbytes`` takes: a multiple of 512 bytes, at least 512."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(nbytes: int) -> int:
    """The ``cudaMalloc`` the allocator makes when no cached block fits a rounded request of ``nbytes``."""
    if nbytes <= SMALL_SIZE:
        return SMALL_SEGMENT
    if nbytes < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-nbytes // ROUND_LARGE) * ROUND_LARGE


@dataclass
class Block:
    segment: int
    offset: int
    size: int
    small: bool
    free: bool = True


class CachingAllocator:
    """Replays ``malloc(name, nbytes)`` and ``free(name)`` calls with the rules above; ``allocated``, ``reserved``
    and their peaks in bytes, as ``torch.cuda.memory_allocated``/``memory_reserved`` and the ``max_*`` would read."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.live: dict[str, Block] = {}
        self.segments: list[int] = []
        self.allocated = self.peak_allocated = 0
        self.live_at_peak: dict[str, int] = {}  # name -> block size, when allocated memory was at its peak
        self.peak_name = ""  # the allocation that set the peak

    @property
    def reserved(self) -> int:
        return sum(self.segments)

    def reset_peak(self) -> None:
        """``torch.cuda.reset_peak_memory_stats``: the peaks restart from what is allocated and reserved now."""
        self.peak_allocated = self.allocated
        self.live_at_peak = {name: block.size for name, block in self.live.items()}
        self.peak_name = ""

    def malloc(self, name: str, nbytes: int) -> int:
        if name in self.live:
            raise ValueError(f"{name} is allocated twice")
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._best_fit(size, small)
        if block is None:
            self.segments.append(segment_size(size))
            block = Block(len(self.segments) - 1, 0, self.segments[-1], small)
            self.blocks.append(block)
        rest = block.size - size
        if (rest >= MIN_BLOCK) if small else (rest > SMALL_SIZE):
            self.blocks.insert(self.blocks.index(block) + 1, Block(block.segment, block.offset + size, rest, small))
            block.size = size
        block.free = False
        self.live[name] = block
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
            self.live_at_peak = {live: b.size for live, b in self.live.items()}
            self.peak_name = name
        return block.size

    def free(self, name: str) -> None:
        block = self.live.pop(name)
        self.allocated -= block.size
        block.free = True
        i = self.blocks.index(block)
        # Merge with the free neighbours in the same segment (blocks are kept in segment, offset order).
        if i + 1 < len(self.blocks) and self.blocks[i + 1].free and self.blocks[i + 1].segment == block.segment:
            block.size += self.blocks.pop(i + 1).size
        if i > 0 and self.blocks[i - 1].free and self.blocks[i - 1].segment == block.segment:
            self.blocks[i - 1].size += self.blocks.pop(i).size

    def _best_fit(self, size: int, small: bool) -> Optional[Block]:
        fits = [b for b in self.blocks if b.free and b.small == small and b.size >= size]
        return min(fits, key=lambda b: (b.size, b.segment, b.offset), default=None)
