"""Atomic writes, one way for the whole studio: a reader (another process, the app, a resumed run) sees the old
version of a file or folder or the new one, complete, never half of either, and a crash loses nothing stored.

- :func:`write_bytes`, :func:`write_json` and :func:`atomic_file` (for a writer that takes a path): a temporary
  sibling, fsynced, renamed over the target, the folder fsynced (so the rename survives a power cut).
- :func:`atomic_folder`: a staging folder filled by the caller, every file fsynced, then swapped in for the target.
  Between the two renames of the swap there is no target; a process killed in that instant leaves the previous
  version beside it, complete, and :func:`restore_interrupted` (called by the next write or read) puts it back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path of ``path`` for the caller to write (by any means: a library that takes a
    path); when the block ends normally, fsync it and rename it over ``path``, else remove it. Readers see the old
    file or the new one, complete, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (creating its folder if needed)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, data: Any, *, indent: int | None = 1) -> None:
    """Replace ``path`` with ``data`` as JSON (and a final newline), atomically and durably."""
    write_bytes(path, (json.dumps(data, indent=indent) + "\n").encode("utf-8"))


def restore_interrupted(directory: str | Path) -> bool:
    """Undo a folder swap killed between its two renames (see :func:`atomic_folder`): ``directory`` is missing and
    its previous version, complete, sits beside it as ``.<name>.old-<pid>``. That version is put back (the newest, if
    several) unless the process that retired it still runs: its swap is under way and renames the new version in a
    moment. Returns whether a folder was put back.
    """
    directory = Path(directory)
    if directory.exists() or not directory.parent.is_dir():
        return False
    interrupted = []
    for retired in directory.parent.glob(f".{directory.name}.old-*"):
        pid = retired.name.rsplit("-", 1)[-1]
        if retired.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            interrupted.append((retired.stat().st_mtime, retired))
    if not interrupted:
        return False
    os.replace(max(interrupted)[1], directory)
    fsync_dir(directory.parent)
    return True


@contextmanager
def atomic_folder(directory: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``directory``; when the block ends normally, fsync every file in it and
    swap it in for ``directory`` (replacing what was there), else remove it.

    Until the swap the old ``directory`` is untouched, so an exception or a crash at any point leaves the old folder
    or the new one, complete, never a mixture. A crash (not an exception) can leave a hidden ``.<name>.saving-*``
    folder behind; nothing reads those.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted(directory)  # so that the retired folder of an earlier crash is replaced, not kept
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving-"))
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(staging)
        retired = None
        if directory.exists():
            retired = directory.parent / f".{directory.name}.old-{os.getpid()}"
            os.replace(directory, retired)
        os.replace(staging, directory)
        fsync_dir(directory.parent)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
