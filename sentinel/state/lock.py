"""One Sentinel per state directory: an exclusive `flock` on `<state_dir>/sentinel.lock`.

Two daemons on one state directory would both act on the same workers (two restarts for
one OOM line) and both deliver the same outbox (issue 15, C5). The first takes the lock
for its whole life; the second finds it held and refuses to start, naming the holder's
pid. The kernel drops the lock when its holder exits, however it exits (kill -9
included), so a crash never leaves a stale lock behind, unlike a pid file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

__all__ = ["LOCK_FILE", "StateDirBusy", "StateDirLock"]

LOCK_FILE = "sentinel.lock"

log = logging.getLogger(__name__)


class StateDirBusy(Exception):
    """Another process holds the state directory's lock; the message says which and what to do."""


class StateDirLock:
    """The lock of one state directory; `acquire()` once, `release()` at exit."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise `StateDirBusy`; OSError when the lock file cannot be created.

        On a filesystem that cannot lock at all, warn and go on without the lock (`held` False).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StateDirBusy(
                f"state directory {self.path.parent} is in use by another Sentinel{holder}: two daemons on one "
                "state directory would both act on the workers and both send every notification. Stop the other "
                "one, or give this one its own state_dir."
            ) from None
        except OSError as exc:
            # A filesystem without locks (some network mounts): say so, and run unguarded
            # rather than not at all.
            os.close(fd)
            log.warning(
                "cannot lock state directory %s (%s): nothing stops a second Sentinel from using it too",
                self.path.parent,
                exc.strerror or exc,
            )
            return
        except BaseException:
            os.close(fd)
            raise
        # The holder's pid, for the refusal message of the next one; best effort.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""
