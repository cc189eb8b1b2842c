"""What the kernel says about this process and this machine, for timing and peak measurements (Linux's /proc):
the process's peak resident set and its reset, and how much of the machine other work took while we timed."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


def read_hwm() -> int:
    """The process's peak resident set (``VmHWM``), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_hwm() -> None:
    """The kernel's peak resident set back to the resident set now (Linux 4.0+: "5" to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, counting time the hypervisor gave to other guests
    (``steal``): /proc/stat's first line, everything but idle and iowait."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest and guest_nice (fields 8, 9) are already counted in user and nice.
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class OtherWork:
    """How much of the machine's CPUs processes other than this one took over a stretch of time: on a shared machine
    the reason a timing cannot be trusted. Use as a context manager; ``share`` is then a fraction of all CPUs."""

    share: float = 0.0

    def __enter__(self) -> OtherWork:
        self._start = (time.perf_counter(), _busy_seconds(), sum(os.times()[:2]))
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = time.perf_counter() - self._start[0], _busy_seconds() - self._start[1], sum(os.times()[:2]) - self._start[2]
        # /proc/stat counts every CPU of the machine (of a container's host, too: there the share is diluted).
        self.share = max(0.0, busy - own) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
