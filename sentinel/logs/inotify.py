"""A minimal, typed binding of Linux inotify (libc through ctypes, no dependency).

Only what the tailer needs: create an instance, add and remove watches, read the
queued events without blocking. Waiting is left to the caller's `select.poll`, so one
poll can also wait on a stop pipe. `Inotify()` raises OSError where inotify is absent
(not Linux, a seccomp filter, the per-user instance limit), and the caller polls instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

__all__ = [
    "IN_ATTRIB",
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_IGNORED",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_MOVE_SELF",
    "IN_ONLYDIR",
    "IN_Q_OVERFLOW",
    "Inotify",
    "InotifyEvent",
]

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then `len` bytes of NUL-padded name)
_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class InotifyEvent:
    wd: int
    mask: int
    cookie: int
    name: str


class _Libc:
    """The three libc entry points, resolved once per process (not at import time)."""

    _lib: ctypes.CDLL | None = None

    @classmethod
    def get(cls) -> ctypes.CDLL:
        if cls._lib is None:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            for name in ("inotify_init1", "inotify_add_watch", "inotify_rm_watch"):
                if not hasattr(lib, name):
                    raise OSError(errno.ENOSYS, f"libc has no {name}")
            lib.inotify_init1.argtypes = [ctypes.c_int]
            lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
            lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
            cls._lib = lib
        return cls._lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


class Inotify:
    """One inotify instance (non-blocking, close-on-exec)."""

    def __init__(self) -> None:
        lib = _Libc.get()
        self._fd = _check(lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")

    def fileno(self) -> int:
        return self._fd

    def add_watch(self, path: str, mask: int) -> int:
        """Watch `path`; returns the watch descriptor (the same one for a path watched twice)."""
        rc: int = _Libc.get().inotify_add_watch(self._fd, os.fsencode(path), mask)
        return _check(rc, f"inotify_add_watch {path}")

    def rm_watch(self, wd: int) -> None:
        """Stop a watch; a watch the kernel already dropped is not an error."""
        try:
            _check(_Libc.get().inotify_rm_watch(self._fd, wd), "inotify_rm_watch")
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise

    def read_events(self) -> list[InotifyEvent]:
        """Every event queued now; an empty list when none (never blocks)."""
        out: list[InotifyEvent] = []
        while True:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return out
            if not data:
                return out
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, cookie, length = _EVENT.unpack_from(data, pos)
                pos += _EVENT.size
                name = os.fsdecode(data[pos : pos + length].rstrip(b"\0"))
                pos += length
                out.append(InotifyEvent(wd, mask, cookie, name))
            if len(data) < _READ_SIZE // 2:
                return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
