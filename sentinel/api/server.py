"""HTTP server: `/metrics`, health endpoints and the JSON API.

Reads are open; nothing here mutates state (the control endpoints come with the
remediation API and need a bearer token). Every request passes the request guard
(Host and Origin checks, no tokens in URLs, bodies read within a deadline; see
`request_guard`) and every connection the connection guard (a cap that closes the
longest-idle connection first; see `guard`), so `/-/healthy` answers while idle or
slow sockets pile up. The bounds come from `http:` in the config (`HttpConfig`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sentinel import __version__
from sentinel.api.exporter import render_metrics
from sentinel.api.guard import ConnectionGuard, GuardedSite
from sentinel.api.request_guard import QuietProtocolErrors, RequestGuard
from sentinel.api.settings import HttpConfig
from sentinel.store import Store

__all__ = ["ServerContext", "ServerGuards", "build_app", "start_server"]


@dataclass
class ServerGuards:
    """The guards of one server, kept for their counters (`sentinel_http_*`)."""

    connections: ConnectionGuard
    requests: RequestGuard

    @classmethod
    def from_config(cls, http: HttpConfig) -> ServerGuards:
        return cls(
            ConnectionGuard(http.max_connections), RequestGuard(http.allowed_hosts, body_timeout_s=http.body_timeout)
        )


@dataclass
class ServerContext:
    """What the handlers read; callables so the daemon can swap parts on reload."""

    store: Store
    ready: Callable[[], bool]
    gpus: Callable[[], list[dict[str, Any]]]
    collectors: Callable[[], list[dict[str, Any]]]
    extra_routes: list[web.RouteDef] = field(default_factory=list)
    http: HttpConfig = field(default_factory=HttpConfig)
    guards: ServerGuards | None = None


CONTEXT = web.AppKey("sentinel_context", ServerContext)


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body, content_type = render_metrics(ctx.store, request.headers.get("Accept"))
    # aiohttp wants the charset apart from the media type.
    media_type, _, params = content_type.partition(";")
    charset = "utf-8" if "charset=utf-8" in params else None
    resp = web.Response(body=body, content_type=media_type.strip(), charset=charset)
    resp.headers["Content-Type"] = content_type
    return resp


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="Sentinel is Healthy.\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[CONTEXT].ready():
        return web.Response(text="Sentinel is Ready.\n")
    return web.Response(status=503, text="Sentinel is not ready yet.\n")


def _api(data: object) -> web.Response:
    return web.json_response({"status": "success", "data": data})


async def api_gpus(request: web.Request) -> web.Response:
    return _api(request.app[CONTEXT].gpus())


async def api_collectors(request: web.Request) -> web.Response:
    return _api(request.app[CONTEXT].collectors())


async def api_buildinfo(request: web.Request) -> web.Response:
    return _api({"version": __version__})


def build_app(ctx: ServerContext) -> web.Application:
    if ctx.guards is None:
        ctx.guards = ServerGuards.from_config(ctx.http)
    app = web.Application(
        middlewares=[ctx.guards.connections.middleware, ctx.guards.requests.middleware],
        client_max_size=ctx.http.max_body_bytes,
    )
    app[CONTEXT] = ctx
    app.add_routes(
        [
            web.get("/metrics", metrics),
            web.get("/-/healthy", healthy),
            web.get("/-/ready", ready),
            web.get("/api/v1/gpus", api_gpus),
            web.get("/api/v1/collectors", api_collectors),
            web.get("/api/v1/status/buildinfo", api_buildinfo),
            *ctx.extra_routes,
        ]
    )
    return app


async def start_server(ctx: ServerContext, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the bound port (port 0 picks one)."""
    app = build_app(ctx)
    assert ctx.guards is not None
    QuietProtocolErrors.install()
    # aiohttp's keep-alive timer also runs from the moment a connection opens, and closes
    # one still waiting for a complete request head: that is our header timeout.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=ctx.http.header_timeout)
    await runner.setup()
    site = GuardedSite(runner, ctx.guards.connections, host=host, port=port)
    await site.start()
    addresses = runner.addresses
    bound = int(addresses[0][1]) if addresses else port
    return runner, bound
