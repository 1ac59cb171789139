"""Replacing a file so that no reader, crash or power cut ever sees half of it.

A temporary file in the same directory (rename(2) is atomic only within one
filesystem), written and fsynced, renamed over the old file, then the directory
fsynced: without that last step a crash can undo the rename. A reader (systemd starting
a unit, another Sentinel call, the next start) sees the old file or the new one.

The one implementation of this in Sentinel: profile env files, pid files, the GPU
count and the log offsets all go through `atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically and durably (module doc).

    A new file gets `mode`; an existing one keeps its mode. Blocking: call it from a
    thread in async code.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        mode = path.stat().st_mode & 0o7777
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
