"""Per-file locks and the clean-up of killed runs, shared by the caches (``cache.py``) and the downloads (``sources.py``).

A lock is ``flock`` on ``.<name>.lock`` beside the file it guards, so two processes (DDP ranks) building the same
cache entry or downloading the same file do it once: the second waits, then finds the file there. The lock file is
removed on release. A killed run leaves temporary files and folders (``.<name>.*.tmp`` and ``.<name>.*.old``, the names
``lm_lightning.io`` gives them); :func:`clear_leftovers` removes those whose name's lock no live process holds.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: no flock; leftovers are then cleared by age alone
    fcntl = None

log = logging.getLogger(__name__)

# Without a working lock, a leftover is only removed once it is this old: no live build keeps a temporary folder
# this long without writing into it (a build writes its files at the end, after tokenizing).
STALE_SECONDS = 30 * 60
# The names atomic_path / atomic_directory give temporary files and folders (.<name>.<random>.tmp, .<name>.<hex>.old),
# and the lock files of entry_lock (.<name>.lock), which a killed process leaves behind.
LEFTOVER = re.compile(r"^\.(?P<name>.+?)(\.[a-z0-9_]+\.(tmp|old)|\.lock)$")


@contextmanager
def entry_lock(target: Path, blocking: bool = True) -> Iterator[Optional[bool]]:
    """Hold the lock on ``target`` (a cache entry or a downloaded file) through ``.<name>.lock`` next to it.

    Yields True when held, False when another process holds it (only with ``blocking=False``), None where the file
    system cannot lock. The lock file is removed before it is released, so none stays behind; a waiter that then gets
    the lock of a removed file notices (the path no longer names its file) and locks the new one instead.
    """
    lock = target.parent / f".{target.name}.lock"
    if fcntl is None:
        yield None
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        except OSError as err:  # ENOLCK, EOPNOTSUPP: some network file systems
            os.close(fd)
            log.debug("No lock on %s (%s): relying on atomic renames alone.", lock, err)
            yield None
            return
        try:
            held = os.stat(lock)
        except FileNotFoundError:
            held = None
        mine = os.fstat(fd)
        if held is not None and (held.st_ino, held.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)  # while still locked: see the docstring
        os.close(fd)


def clear_leftovers(folder: Path) -> list[Path]:
    """Remove temporary files and folders of killed runs in ``folder``: those whose name's lock nobody holds."""
    removed = []
    try:
        candidates = [p for p in folder.iterdir() if LEFTOVER.match(p.name)]
    except OSError:
        return removed
    for path in candidates:
        name = LEFTOVER.match(path.name)["name"]
        try:
            with entry_lock(folder / name, blocking=False) as held:
                if held is False or (held is None and time.time() - path.lstat().st_mtime < STALE_SECONDS):
                    continue  # a live build (or, without locks, a recent one) may still be writing it
                if path.name.endswith(".lock"):
                    continue  # entry_lock removes it on release
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        except OSError:  # a read-only folder, or removed meanwhile by another process: nothing to do
            continue
        removed.append(path)
    if removed:
        log.info("Removed %d leftover(s) of interrupted runs in %s: %s", len(removed), folder, [p.name for p in removed])
    return removed
