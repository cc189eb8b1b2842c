"""Atomic file writes: a crash or Ctrl-C never leaves a half-written cache, vocabulary or export behind.

Everything is written to a temporary sibling first and moved into place with ``os.replace``, which is atomic
on POSIX and Windows when source and target are on the same file system (hence a sibling, not ``/tmp``).

File modes follow the umask the way a plain ``open()`` does: the temporary file (folder) is created with
``os.open(..., 0o666)`` (``os.mkdir(..., 0o777)``), so the kernel applies the umask (and any default ACL). The
process umask is never read by setting it, which would race with other threads creating files meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_ATTEMPTS = 100  # unique names to try before giving up (a clash needs another writer with the same random name)


def _create(target: Path, make: Callable[[Path], None]) -> Path:
    """A new temporary sibling ``.<name>.<random>.tmp`` of ``target`` (the pattern the cache's clean-up of killed runs
    looks for), made by ``make``, which must fail if the name exists."""
    for _ in range(_ATTEMPTS):
        path = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            make(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {target}")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _new_folder(path: Path) -> None:
    os.mkdir(path, 0o777)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it onto ``target`` only if the block succeeds.

    The block may write the path in place or replace it (safetensors writes its own temporary file and renames it,
    which leaves it 0600); either way the result gets the mode the umask gave the file when it was created here.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create(target, _new_file)
    mode = tmp_path.stat().st_mode & 0o777
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        # On disk before the rename: after a power cut the target is the old file or the new one, never empty.
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
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
    tmp = _create(target, _new_folder)  # 0777 minus the umask, as a plain mkdir: a shared cache must be readable
    try:
        yield tmp
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


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read 1 MiB at a time: caches, exports and ONNX exports all check their files with it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_sha256(value: object) -> bool:
    """A hex SHA-256 as the manifests write it: 64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# How libraries report a write the full disk cut short when they drop the errno: numpy's tofile ("1020499 requested and
# 495584 written") and torch's zip writer ("[enforce fail at inline_container.cc:...] . unexpected pos ...", raised as a
# RuntimeError while it handles the ENOSPC; also "file write failed").
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written|unexpected pos \d+|file write failed|No space left on device|Disk quota exceeded")


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is a write that failed because the disk or the quota is full,
    however the library reported it: an errno, or a short write's message without one."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, (OSError, RuntimeError)) and _SHORT_WRITE.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False

