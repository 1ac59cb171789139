"""HTTP server: `/metrics`, health endpoints and the JSON API.

Reads are open; nothing here mutates state (the control endpoints come with the
remediation API and need a bearer token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sentinel import __version__
from sentinel.api.exporter import render_metrics
from sentinel.store import Store

__all__ = ["ServerContext", "build_app", "start_server"]


@dataclass
class ServerContext:
    """What the handlers read; callables so the daemon can swap parts on reload."""

    store: Store
    ready: Callable[[], bool]
    gpus: Callable[[], list[dict[str, Any]]]
    collectors: Callable[[], list[dict[str, Any]]]
    extra_routes: list[web.RouteDef] = field(default_factory=list)


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
    app = web.Application()
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
    runner = web.AppRunner(build_app(ctx), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = port
    server: Any = site._server  # aiohttp exposes no public accessor for the bound sockets
    if server is not None and getattr(server, "sockets", None):
        bound = int(server.sockets[0].getsockname()[1])
    return runner, bound
