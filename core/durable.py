"""Durable file replacement: a reader sees the old file or the new one, never half of one.

The one writer every run-folder, ledger and optimiser-state file goes through."""

from __future__ import annotations

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
