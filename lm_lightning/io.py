"""Atomic file writes: a crash or Ctrl-C never leaves a half-written cache, vocabulary or export behind.

Everything is written to a temporary sibling first and moved into place with ``os.replace``, which is atomic
on POSIX and Windows when source and target are on the same file system (hence a sibling, not ``/tmp``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; rename it to ``target`` only if the block succeeds.

    ``replace=False`` (caches): if another process created ``target`` meanwhile (two DDP ranks building the same
    cache), its copy wins and ours is discarded: both hold the same content because the directory name is a content
    hash. ``replace=True`` (exports): an existing ``target`` is replaced, by two renames, so the old folder is moved
    aside, not deleted, until the new one is in place (only a crash between the renames leaves it under
    ``.<name>.<id>.old``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700 folders; a shared cache must be readable
        if replace and target.exists():
            _swap(tmp, target)
            return
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(tmp: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
