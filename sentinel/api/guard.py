"""A bound on the HTTP server's connections, so idle sockets cannot starve the daemon.

aiohttp accepts every connection and keeps it until its keep-alive timeout (75 s by
default), with no cap: 1,100 idle local connections under the default 1,024-descriptor
soft limit left `/-/healthy` and the collectors without file descriptors. The guard
wraps the server's protocol factory:

- at most `max_connections` are open at once. When one more arrives, the connection
  idle the longest (no request being handled on it) is closed to make room, as nginx
  drains idle keep-alive connections when it runs out; an attacker's idle or
  slow-header sockets are always the first to go, and a real request gets in. Only
  when every connection is busy handling a request is the new one closed instead;
- a connection that has not sent a complete request head within `header_timeout`
  (a slowloris) is closed by aiohttp's own keep-alive timer, which the server
  starts at connection time; the runner is built with `keepalive_timeout=header_timeout`.

Which connections are busy is known from a middleware (`guard.middleware`) that marks
a connection while one of its requests is handled. The site classes are aiohttp's
`BaseSite` with our protocol factory; the runner's public `addresses` keeps working.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

__all__ = ["ConnectionGuard", "GuardedSite"]

log = logging.getLogger(__name__)

_LOG_EVERY_S = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _GuardedProtocol(asyncio.Protocol):
    """Forwards every event to aiohttp's request handler, telling the guard about the connection."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self._guard.admit(self):
            transport.abort()  # never handed to aiohttp: connection_lost still comes, to us
            return
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        admitted = self._guard.release(self)
        if admitted:
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionGuard:
    """Caps open connections, closing the longest-idle one to admit a new one."""

    def __init__(self, max_connections: int, name: str = "http") -> None:
        self.max_connections = max_connections
        self.name = name
        self.evicted_total = 0
        self.refused_total = 0
        self.accepted_total = 0
        # handler -> its guarded protocol, oldest activity first
        self._open: OrderedDict[object, _GuardedProtocol] = OrderedDict()
        self._busy: dict[object, int] = {}
        self._closing: set[object] = set()  # evicted, connection_lost not yet seen
        self._last_log = 0.0
        self._unlogged = 0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def protocol_factory(self, server: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        """Wrap aiohttp's protocol factory (`runner.server`)."""

        def factory() -> asyncio.Protocol:
            return _GuardedProtocol(self, server())

        return factory

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the request's connection busy while it is handled."""
        key = request.protocol
        self._busy[key] = self._busy.get(key, 0) + 1
        try:
            return await handler(request)
        finally:
            left = self._busy.get(key, 1) - 1
            if left > 0:
                self._busy[key] = left
            else:
                self._busy.pop(key, None)
            if key in self._open:
                self._open.move_to_end(key)  # just active: last to be evicted

    def admit(self, proto: _GuardedProtocol) -> bool:
        """Make room for a new connection; False when it must be closed instead."""
        if len(self._open) >= self.max_connections and not self._evict_idle():
            self.refused_total += 1
            self._note("every connection is busy: refused a new one")
            return False
        self._open[proto.inner] = proto
        self.accepted_total += 1
        return True

    def release(self, proto: _GuardedProtocol) -> bool:
        """Forget a closed connection; True when it had been admitted."""
        self._busy.pop(proto.inner, None)
        if proto.inner in self._closing:
            self._closing.discard(proto.inner)
            return True
        return self._open.pop(proto.inner, None) is not None

    def _evict_idle(self) -> bool:
        for handler, proto in self._open.items():
            if handler in self._busy:
                continue
            del self._open[handler]
            # aiohttp hears of it through connection_lost, which abort() schedules.
            self._closing.add(handler)
            if proto.transport is not None:
                proto.transport.abort()
            self.evicted_total += 1
            self._note("closed the longest-idle connection to admit a new one")
            return True
        return False

    def _note(self, what: str) -> None:
        # Under attack this happens thousands of times a second: one line a minute.
        now = time.monotonic()
        self._unlogged += 1
        if now - self._last_log >= _LOG_EVERY_S:
            log.warning(
                "%s server: %d connections open (max %d): %s (%d such events since the last line)",
                self.name,
                len(self._open),
                self.max_connections,
                what,
                self._unlogged,
            )
            self._last_log = now
            self._unlogged = 0


class GuardedSite(web.BaseSite):
    """A TCP (host, port) or pre-bound socket site whose connections go through a guard."""

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ConnectionGuard,
        *,
        host: str | None = None,
        port: int = 0,
        sock: socket.socket | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._guard = guard
        self._host = host
        self._port = port
        self._sock = sock

    @property
    def name(self) -> str:
        if self._sock is not None:
            return f"sock:{self._sock.getsockname()!r}"
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        factory = self._guard.protocol_factory(server)
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)
        else:
            self._server = await loop.create_server(
                factory, self._host, self._port, reuse_address=True, backlog=self._backlog
            )
