"""Files that are either whole or absent: write to a temporary name, fsync, rename, fsync dir.

Standard library only (edge nodes, the control plane and the model tools all use it). A reader
— an edge node swapping models, a router reloading keys — never sees half a file, and a crash
right after a write loses nothing that was reported written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | Path) -> None:
    """Make the renames in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path, *, mode: int = 0o644, tmp_dir: str | Path | None = None,
                  exclusive: bool = False) -> Iterator[BinaryIO]:
    """A file that becomes ``path`` when the block ends without error; on an error, nothing.

    ``tmp_dir`` holds the temporary file (same filesystem as ``path``) where crash leftovers are
    swept. ``exclusive`` publishes with a hard link, so a file already at ``path`` wins and
    FileExistsError is raised: two processes creating one key end up with the same one.
    """
    path = Path(path)
    # mkstemp creates the file 0600, so a secret is never readable by others, even briefly;
    # wider modes are set before the rename makes the file visible.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=tmp_dir or path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if mode != 0o600:
            os.chmod(tmp, mode)
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes | str, *, mode: int = 0o644,
                 tmp_dir: str | Path | None = None, exclusive: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically; the file has ``mode`` from its first byte
    (``tmp_dir`` and ``exclusive`` as in ``atomic_writer``)."""
    with atomic_writer(path, mode=mode, tmp_dir=tmp_dir, exclusive=exclusive) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
