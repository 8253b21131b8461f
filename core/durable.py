"""Files that are either whole or absent: write to a temporary name, fsync, rename, fsync dir.

Standard library only (edge nodes, the control plane and the model tools all use it). A reader
— an edge node swapping models, a router reloading keys — never sees half a file, and a crash
right after a write loses nothing that was reported written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make the renames in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, *, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` atomically; the file has ``mode`` from its first byte."""
    path = Path(path)
    # mkstemp creates the file 0600, so a secret is never readable by others, even briefly;
    # wider modes are set before the rename makes the file visible.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode != 0o600:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
