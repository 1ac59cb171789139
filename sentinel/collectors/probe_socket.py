"""The unix socket that probe reports arrive on: created with its mode and group, never in between.

The socket file's permissions are the access control of this transport (connecting
needs write permission on it), so it must never exist with looser ones, not even for a
moment: it is bound under a temporary name in the same directory, given its mode and
group, then renamed into place (rename is atomic and replaces a stale socket left by a
killed Sentinel). A path held by something that is not a socket is never removed, and
a socket another live process still listens on is not taken over.

Under the shipped unit, systemd's `RuntimeDirectory=sentinel` makes `/run/sentinel`
(0750, owner sentinel) and `$RUNTIME_DIRECTORY` points at it; `sentinel.tmpfiles`
gives the directory the same owner and mode outside the unit's lifetime.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from dataclasses import dataclass

__all__ = ["BoundSocket", "ProbeSocketError", "bind_probe_socket", "remove_probe_socket"]


class ProbeSocketError(OSError):
    """The socket cannot be created as configured; the message names the path and the remedy."""


@dataclass(frozen=True)
class BoundSocket:
    """A listening socket and the identity (device, inode) of the file it was bound to."""

    sock: socket.socket
    path: str
    identity: tuple[int, int]


def bind_probe_socket(path: str, mode: int, group: str | None) -> BoundSocket:
    """A listening unix socket at `path` with file mode `mode` and group `group` (blocking)."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ProbeSocketError(
            errno.ENOENT, f"probe socket {path}: directory {directory} does not exist (RuntimeDirectory= makes it)"
        )
    _refuse_to_replace(path)
    gid = _group_id(group, path) if group is not None else -1
    temporary = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temporary)
        try:
            os.chmod(temporary, mode)
            if gid != -1:
                os.chown(temporary, -1, gid)
            os.rename(temporary, path)
            info = os.lstat(path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if isinstance(exc, ProbeSocketError):
            raise
        raise ProbeSocketError(exc.errno or 0, f"probe socket {path}: {exc.strerror or exc}") from None
    return BoundSocket(sock, path, (info.st_dev, info.st_ino))


def remove_probe_socket(bound: BoundSocket) -> None:
    """Unlink the socket file if it is still the one we bound (a newer Sentinel may own the path now)."""
    try:
        current = os.lstat(bound.path)
    except OSError:
        return
    if (current.st_dev, current.st_ino) == bound.identity:
        with contextlib.suppress(OSError):
            os.unlink(bound.path)


def _refuse_to_replace(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ProbeSocketError(errno.EEXIST, f"probe socket {path}: the path exists and is not a socket; remove it")
    if _is_live(path):
        raise ProbeSocketError(
            errno.EADDRINUSE, f"probe socket {path}: another process is listening on it (a second Sentinel?)"
        )


def _is_live(path: str) -> bool:
    """Whether some process accepts connections on the socket file."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _group_id(group: str, path: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        problem = f"probe socket {path}: probe.socket_group {group!r} does not exist"
        raise ProbeSocketError(errno.EINVAL, problem) from None
