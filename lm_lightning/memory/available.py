"""Memory this process may still take, and sizes in words: torch-free, so that ``deploy/`` (which never imports torch)
can check a request against it as the training side does.

What can still be allocated is the least of three limits, each where the system reports it: the kernel's estimate
of memory available without swapping (``MemAvailable`` in ``/proc/meminfo``), the container's memory cgroup (v2's
``memory.max`` or v1's ``memory.limit_in_bytes``, less what it uses), and the process's address-space limit
(``ulimit -v``, less its present virtual size). None of them is known on macOS or Windows: ``None`` there, and the
callers skip the check.
"""

from __future__ import annotations

from typing import Optional

try:
    import resource
except ImportError:  # Windows
    resource = None

# Cgroup files (limit, usage): v2 at the root of the container's view, then v1.
_CGROUPS = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)
_NO_LIMIT = 1 << 60  # v1 writes "no limit" as a page-rounded 2**63 - 1


def _read_kib(path: str, key: str) -> Optional[int]:
    """``key: N kB`` of a /proc file, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_free() -> Optional[int]:
    for limit_path, usage_path in _CGROUPS:
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < _NO_LIMIT:
            return max(0, int(limit) - usage)
        return None
    return None


def _address_space_free() -> Optional[int]:
    if resource is None:
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    size = _read_kib("/proc/self/status", "VmSize")
    return None if size is None else max(0, limit - size)


def available_bytes() -> Optional[int]:
    """Bytes this process can still allocate, as far as the system says (``None`` where it says nothing)."""
    found = [n for n in (_read_kib("/proc/meminfo", "MemAvailable"), _cgroup_free(), _address_space_free()) if n is not None]
    return min(found) if found else None


def human_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    raise AssertionError("unreachable")
