"""systemd's notify protocol: one datagram per state change to $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["SystemdNotifier"]

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends `READY=1`, `WATCHDOG=1`, `STATUS=...`; a no-op when not under systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@' and addressed with a NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # systemd wants a ping at least every WATCHDOG_USEC; half of it leaves slack.
            self.watchdog_interval_s = int(usec) / 1e6 / 2
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        """Send the fields as one datagram; failures are logged, never raised."""
        if self._sock is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            self._sock.sendto(payload, self._address)
            return True
        except OSError as exc:
            log.warning("systemd notify to %s failed: %s", self._address.replace("\0", "@"), exc)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
