"""Atomic, durable writes: the one way nanosil writes a file or a folder that a reader or a resume relies on.

Every writer goes through a temporary sibling that is flushed and fsynced, then renamed over the target,
and the folder is fsynced so the rename itself survives a power cut: a crash leaves the old version or
the new one, never a torn one. Folders (committees) are swapped with Linux's ``renameat2(RENAME_EXCHANGE)``
so the target path never stops existing; where that call is missing, two renames are the fallback.

It lives in :mod:`spectra`, the leaf package (numpy/scipy/ASE only), because every other package of
nanosil imports spectra and spectra imports none of them.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["write_with", "write_text", "write_json", "write_dir", "fsync_dir"]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames inside ``folder`` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder we may not open
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems without directory fsync
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_with(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, fsync it and rename it over ``path``.

    ``suffix`` keeps the extension for writers that pick the format from it (matplotlib, ASE).
    """
    path = Path(path)
    if path.is_dir():  # named here: the rename would otherwise report the temporary file
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` to ``path``, atomically and durably (UTF-8)."""
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data, indent: int | None = 1) -> Path:
    """``data`` as JSON (a trailing newline), atomically and durably."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux >= 3.15); False where the call is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def write_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a whole folder in a temporary sibling with ``write(tmp)``, fsync its files, then swap it in.

    The target path exists at every instant (old content, then new): a reader or a crash never meets
    half a model or no model.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for item in tmp.rglob("*"):
            if item.is_file():
                _fsync_file(str(item))
        fsync_dir(tmp)
        if target.exists() and _exchange(tmp, target):
            pass  # tmp now holds the old folder: removed below
        elif target.exists():  # pragma: no cover - no renameat2: two renames, a short gap
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
