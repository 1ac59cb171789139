"""Refusing requests a browser was tricked into sending, and bounding request bodies.

A web page open in a browser on the GPU host can send requests to 127.0.0.1:9847:

- cross-origin "simple" POSTs (form or text/plain bodies, no preflight) reach the
  mutating endpoints. Every request whose method changes state (anything but GET,
  HEAD, OPTIONS) is refused when the browser says it is cross-origin: a
  `Sec-Fetch-Site` of `cross-site` or `same-site`, or an `Origin` whose host and port
  are not the request's own. Programs (curl, the CLI, Prometheus, the probe) send
  neither header and are not affected;
- DNS rebinding: a page at `http://evil.example:9847` whose name later resolves to
  127.0.0.1 is same-origin with Sentinel in the browser's eyes, so it could read every
  GET API. Its requests carry `Host: evil.example:9847`, so every request (reads too)
  must name a host Sentinel serves: an IP address, `localhost`, this machine's own
  names, or one of `http.allowed_hosts` (`*` turns the check off).

Tokens are accepted only in the `Authorization` header: a query string with a
`token`-like parameter is refused outright, since URLs end up in proxy logs, browser
history and `Referer` headers.

Request bodies are read here, before any handler, within `body_timeout` and
`max_body_bytes` (aiohttp's `client_max_size`): a client that trickles a body cannot
hold a handler forever, and handlers find the body already read.

Malformed requests (a header line over 8 KiB, garbage instead of HTTP) are answered
400 by aiohttp, which also logs each with a full traceback: a flood of them wrote
68 MB of tracebacks in 30 s. `QuietProtocolErrors` turns those into one line a minute
with a count.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from sentinel.runtime.timeouts import wait_for

__all__ = ["QuietProtocolErrors", "RequestGuard", "host_names_of_this_machine"]

_QUIET_EVERY_S = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TOKEN_PARAMETERS = frozenset({"token", "access_token", "bearer", "auth", "authorization"})
_CROSS = frozenset({"cross-site", "same-site"})


def host_names_of_this_machine() -> frozenset[str]:
    """`localhost` and this machine's host name and FQDN, lower-case."""
    names = {"localhost"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower().rstrip("."))
    return frozenset(names)


class QuietProtocolErrors(logging.Filter):
    """On aiohttp's server logger: a malformed request is one line a minute, never a traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.suppressed = 0
        self._last = -_QUIET_EVERY_S

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self._last < _QUIET_EVERY_S:
            self.suppressed += 1
            return False
        self._last = now
        record.msg = "malformed HTTP request answered 400 (%s: %s; %d more since the last such line)"
        record.args = (type(exc).__name__, str(exc)[:200], self.suppressed)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        self.suppressed = 0
        return True

    @classmethod
    def install(cls) -> None:
        """Attach one filter to aiohttp's server logger (idempotent)."""
        logger = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"status": "error", "errorType": kind, "error": message}, status=status)


def _split_host(value: str) -> tuple[str, str]:
    """(host, port) of a Host header value; IPv6 stays without its brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, ""
        return value[1:end], value[end + 2 :] if value[end + 1 : end + 2] == ":" else ""
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return host.rstrip("."), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class RequestGuard:
    """The middleware above; `allowed_hosts` and the limits can be replaced on reload."""

    def __init__(
        self,
        allowed_hosts: Iterable[str] = (),
        *,
        body_timeout_s: float = 10.0,
        machine_names: frozenset[str] | None = None,
    ) -> None:
        self._machine = machine_names if machine_names is not None else host_names_of_this_machine()
        self.body_timeout_s = body_timeout_s
        self.refused_total: dict[str, int] = {"host": 0, "origin": 0, "query_token": 0, "body_timeout": 0}
        self.set_allowed_hosts(allowed_hosts)

    def set_allowed_hosts(self, allowed_hosts: Iterable[str]) -> None:
        names = {h.lower().rstrip(".") for h in allowed_hosts}
        self._any_host = "*" in names
        self._names = self._machine | names

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a Host header names a host Sentinel serves (a missing one is HTTP/1.0's)."""
        if host_header is None or self._any_host:
            return True
        host, _ = _split_host(host_header)
        return _is_ip(host) or host in self._names

    def _cross_origin(self, request: web.Request) -> str | None:
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site.strip().lower() in _CROSS:
            return f"Sec-Fetch-Site: {site.strip()}"
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        parts = urlsplit(origin.strip())
        if origin.strip().lower() == "null" or not parts.hostname:
            return f"Origin: {origin.strip()[:100]}"
        default = {"http": 80, "https": 443}.get(parts.scheme, 0)
        try:
            origin_port = parts.port or default
        except ValueError:
            return f"Origin: {origin.strip()[:100]}"
        host, port = _split_host(request.headers.get("Host", ""))
        request_port = int(port) if port.isdigit() else default
        if (parts.hostname.lower().rstrip("."), origin_port) != (host, request_port):
            return f"Origin: {origin.strip()[:100]}"
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.host_allowed(request.headers.get("Host")):
            self.refused_total["host"] += 1
            return _error(
                403,
                "forbidden",
                f"Host {request.headers.get('Host', '')[:100]!r} is not a name this Sentinel serves "
                "(add it to http.allowed_hosts)",
            )
        if request.method not in _SAFE_METHODS:
            why = self._cross_origin(request)
            if why is not None:
                self.refused_total["origin"] += 1
                return _error(403, "forbidden", f"cross-origin request refused ({why})")
        if any(key.lower() in _TOKEN_PARAMETERS for key in request.query):
            self.refused_total["query_token"] += 1
            return _error(
                400,
                "bad_data",
                "tokens are accepted only in the Authorization header, never in the URL "
                "(URLs end up in logs and browser history)",
            )
        if request.body_exists:
            try:
                await wait_for(request.read(), self.body_timeout_s)
            except asyncio.TimeoutError:
                self.refused_total["body_timeout"] += 1
                return _error(408, "timeout", f"the request body did not arrive within {self.body_timeout_s:g}s")
        return await handler(request)
