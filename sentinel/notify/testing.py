"""Test and benchmark helpers: a real HTTP receiver that records requests, and synthetic alert events.

`RecordingReceiver` is an aiohttp server on a loopback port playing Slack, a webhook
consumer or an Alertmanager: it answers from a script (`ok`, then 429 with
Retry-After, then 500, ...) and records what arrived and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from sentinel.notify.dispatcher import Notifier
from sentinel.notify.settings import NotifyConfig
from sentinel.rules.manager import AlertEvent
from sentinel.rules.rulefile import Rule
from sentinel.rules.state import Alert, AlertState, Transition
from sentinel.runtime.timeouts import wait_for
from sentinel.store import Store

__all__ = [
    "RecordedRequest",
    "RecordingReceiver",
    "Reply",
    "alert_event",
    "eventually",
    "running_notifier",
    "wait_drained",
]

EXTERNAL_URL = "http://sentinel.test:9101/"


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    body: str = "ok"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedRequest:
    """A request as it arrived, with the reply it got."""

    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    path: str
    headers: Mapping[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


class RecordingReceiver:
    """A loopback HTTP server that answers POSTs from a script, then with `default`."""

    def __init__(self, script: Sequence[Reply] = (), default: Reply = Reply(), *, port: int = 0) -> None:
        self.script = list(script)
        self.default = default
        self.requests: list[RecordedRequest] = []
        self._port = port
        self._runner: web.AppRunner | None = None
        self._arrived = asyncio.Condition()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def accepted(self) -> list[RecordedRequest]:
        """Requests answered with a 2xx."""
        return [r for r in self.requests if 200 <= r.status < 300]

    async def start(self) -> RecordingReceiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> RecordingReceiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        reply = self.script.pop(0) if self.script else self.default
        self.requests.append(
            RecordedRequest(time.monotonic(), time.time(), request.path_qs, dict(request.headers), body, reply.status)
        )
        async with self._arrived:
            self._arrived.notify_all()
        return web.Response(status=reply.status, text=reply.body, headers=dict(reply.headers))

    async def wait_for(self, accepted: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until `accepted` requests got a 2xx; raises TimeoutError with what did arrive."""

        async def enough() -> None:
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.accepted()) >= accepted)

        try:
            await wait_for(enough(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{len(self.accepted())} of {accepted} requests accepted within {timeout}s "
                f"({len(self.requests)} arrived)"
            ) from None
        return self.accepted()


async def eventually(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.02)


async def wait_drained(notifier: Notifier, timeout: float = 10.0) -> None:
    """Wait until every queue of the notifier is empty (delivered rows are deleted after the answer)."""
    await eventually(lambda: not any(notifier.queue_lengths().values()), timeout, "empty queues")


def alert_event(
    alertname: str,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    *,
    status: str = "firing",
    value: float = 1.0,
    active_at_ms: int | None = None,
    fired_at_ms: int | None = None,
    at_ms: int | None = None,
    expr: str = "up == 0",
) -> AlertEvent:
    """A RuleManager event: a transition to `firing`, to `resolved`, or to `pending` at `at_ms`."""
    now = at_ms if at_ms is not None else int(time.time() * 1000)
    active = active_at_ms if active_at_ms is not None else now - 1000
    if fired_at_ms is None:
        fired_at_ms = now if status == "firing" else active
    rule = Rule(kind="alert", name=alertname, expr=expr, file="test.rules.yml", group="test", index=0, line=1)
    base = Alert(
        labels={**(labels or {}), "alertname": alertname},
        annotations=dict(annotations or {}),
        state=AlertState.FIRING,
        value=value,
        active_at_ms=active,
        fired_at_ms=fired_at_ms,
    )
    if status == "firing":
        transition = Transition(base, AlertState.PENDING, AlertState.FIRING, now)
    elif status == "resolved":
        resolved = Alert(**{**base.__dict__, "state": AlertState.INACTIVE, "resolved_at_ms": now})
        transition = Transition(resolved, AlertState.FIRING, AlertState.INACTIVE, now)
    elif status == "pending":
        pending = Alert(**{**base.__dict__, "state": AlertState.PENDING, "fired_at_ms": None})
        transition = Transition(pending, AlertState.INACTIVE, AlertState.PENDING, now)
    else:
        raise ValueError(f"unknown status {status!r}")
    return AlertEvent(transition, rule, "test", "test.rules.yml")


@contextlib.asynccontextmanager
async def running_notifier(
    config: NotifyConfig | Mapping[str, Any],
    state_dir: Path,
    *,
    store: Store | None = None,
    external_url: str = EXTERNAL_URL,
    external_labels: Mapping[str, str] | None = None,
    eval_interval_s: float = 1.0,
    **kwargs: Any,
) -> AsyncIterator[Notifier]:
    """A started notifier on `state_dir`, closed on exit; `config` may be a plain dict."""
    cfg = config if isinstance(config, NotifyConfig) else NotifyConfig.model_validate(config)
    notifier = Notifier(
        cfg,
        store if store is not None else Store(),
        state_dir,
        external_url,
        external_labels or {},
        eval_interval_s,
        **kwargs,
    )
    await notifier.start()
    try:
        yield notifier
    finally:
        await notifier.close()
