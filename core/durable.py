"""Durable file replacement: a reader sees the old file or the new one, never half of one.

The one writer every run-folder, ledger and optimiser-state file (and every site-track
version folder) goes through."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _sync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def replace_durably(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temp file beside ``path``, fsync it, rename it over ``path`` and
    fsync the folder, so the new content survives a crash or power loss once this returns.

    For writers that take a file name (e.g. safetensors' ``save_file``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably (see :func:`replace_durably`)."""
    replace_durably(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, payload: Any) -> None:
    """Replace ``path`` with ``payload`` as indented JSON, durably."""
    write_durably(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))


def publish_numbered(parent: Path, prefix: str, fill: Callable[[Path, int], None]) -> Path:
    """Publish the next free ``parent/<prefix>NNN`` folder whole or not at all: under a lock
    (concurrent writers get different numbers), ``fill(tmp, NNN)`` writes its files into a
    temp folder beside it; they are fsynced, the folder is renamed into place and ``parent``
    fsynced. A ``fill`` that raises leaves nothing behind (a killed process may leave a
    hidden ``.<prefix>-*`` temp folder, never a numbered one)."""
    import shutil
    import tempfile

    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".{prefix}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        taken = [int(p.name[len(prefix):]) for p in parent.glob(f"{prefix}*")
                 if p.name[len(prefix):].isdigit()]
        number = max(taken, default=0) + 1
        final = parent / f"{prefix}{number:03d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=parent))
        try:
            fill(tmp, number)
            for item in tmp.iterdir():
                if item.is_file():
                    with open(item, "rb") as fh:
                        os.fsync(fh.fileno())
            _sync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _sync_dir(parent)
    return final
