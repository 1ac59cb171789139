"""POSTing a JSON report to the daemon over TCP or a unix socket, with the stdlib only.

The probe lives in the serving process, so it brings no HTTP client of its own and no
event loop: `http.client` on a fresh connection per report (one a second over loopback
costs nothing next to a forward pass, and a fresh connection never inherits a broken
one's state). Every call is bounded by its timeout.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sentinel.probe.report import REPORT_PATH

__all__ = [
    "TOKEN_FILE_ENV",
    "DeliveryError",
    "Target",
    "get_json",
    "parse_target",
    "post_json",
    "read_token_file",
]

_MAX_REPLY_BYTES = 64 * 1024
_MAX_TOKEN_BYTES = 4096
TOKEN_FILE_ENV = "SENTINEL_PROBE_TOKEN_FILE"
"""Where `attach` reads the probe token when no `token_file` is given (a systemd credential)."""


class DeliveryError(Exception):
    """The report did not reach the daemon, or its answer was not understood."""


@dataclass(frozen=True)
class Target:
    """Where reports go: a TCP host and port, or a unix socket path; the HTTP path; the token.

    `token` is the worker's probe token (`workers[].probe_token_file` on Sentinel's
    side), sent as `Authorization: Bearer`; never shown by `repr` or `describe`.
    """

    path: str
    host: str = ""
    port: int = 0
    unix_socket: str = ""
    token: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        return (
            f"unix:{self.unix_socket}{self.path}" if self.unix_socket else f"http://{self.host}:{self.port}{self.path}"
        )


def parse_target(sentinel: str, token: str | None = None) -> Target:
    """`http://host:port[/path]`, `unix:/path/to.sock` or a bare absolute socket path."""
    if sentinel.startswith("unix:") or sentinel.startswith("/"):
        path = sentinel.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"sentinel={sentinel!r}: a unix socket needs an absolute path")
        return Target(path=REPORT_PATH, unix_socket=path, token=token)
    parts = urlsplit(sentinel)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"sentinel={sentinel!r}: expected http://host:port or unix:/path/to.sock")
    if parts.query or parts.username or parts.password:
        raise ValueError(f"sentinel={sentinel!r}: no credentials or query in the URL; pass token_file=")
    return Target(
        path=parts.path if parts.path not in ("", "/") else REPORT_PATH,
        host=parts.hostname,
        port=parts.port or 80,
        token=token,
    )


def read_token_file(path: str) -> str:
    """The probe token in `path` (surrounding whitespace stripped); ValueError naming the file."""
    try:
        with open(os.path.expandvars(path), encoding="utf-8") as f:
            token = f.read(_MAX_TOKEN_BYTES + 1).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"probe token file {path}: cannot read it ({exc})") from None
    if not token or len(token) > _MAX_TOKEN_BYTES:
        raise ValueError(f"probe token file {path}: expected one token of 1 to {_MAX_TOKEN_BYTES} characters")
    return token


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def post_json(target: Target, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """POST `payload`; returns the daemon's JSON object or raises `DeliveryError`."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _exchange(target, "POST", target.path, body, timeout_s, _MAX_REPLY_BYTES)


def get_json(target: Target, path: str, timeout_s: float, max_bytes: int = 16 * 1024 * 1024) -> dict[str, Any]:
    """GET `path` (on the daemon that `target` names, with its token); the JSON object, or `DeliveryError`.

    For what does not fit in a report's reply, e.g. a placement (up to `max_bytes`).
    """
    if not path.startswith("/"):
        raise DeliveryError(f"{target.describe()}: expected an absolute path, got {path!r}")
    return _exchange(target, "GET", path, None, timeout_s, max_bytes)


def _exchange(
    target: Target, method: str, path: str, body: bytes | None, timeout_s: float, max_bytes: int
) -> dict[str, Any]:
    conn: http.client.HTTPConnection = (
        _UnixConnection(target.unix_socket, timeout_s)
        if target.unix_socket
        else http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)
    )
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if target.token:
            headers["Authorization"] = f"Bearer {target.token}"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read(max_bytes)
        if response.status != 200:
            raise DeliveryError(f"{target.describe()} answered HTTP {response.status}: {raw[:200]!r}")
        reply = json.loads(raw)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DeliveryError(f"{target.describe()}: {exc}") from exc
    finally:
        conn.close()
    if not isinstance(reply, dict):
        raise DeliveryError(f"{target.describe()} answered {type(reply).__name__}, not a JSON object")
    return reply
