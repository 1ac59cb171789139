"""Helpers shared by the probe tests (torch stays optional), and the tests of the helpers.

`require_module("torch")` skips a test where torch is not installed, except under CI
(`CI=true`), where a missing torch is a broken environment and must fail the run: the
probe tests are the only coverage of the in-worker probe.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from sentinel.store import Labels, Store, labels_from
from sentinel.store.events import Event, EventBus
from tests.conftest import require_module

if TYPE_CHECKING:
    from sentinel.collectors.probe_reports import ProbeRegistry


PROBED_WORKERS = ("w0", "w1", "fair", "hot")
"""Workers the test daemon accepts reports for (over its unix socket, without tokens)."""


@dataclass
class Daemon:
    """The daemon side of the probe, served for real by aiohttp on a unix socket.

    `url` is what a probe attaches to (`unix:/...`), as the probe's docs recommend;
    `tcp_url` is the HTTP server's base URL, whose report route answers only when the
    registry's access allows TCP.
    """

    store: Store
    bus: EventBus
    registry: ProbeRegistry
    url: str
    tcp_url: str
    socket: str
    events: list[Event]

    def value(self, name: str, **labels: str) -> float | None:
        """Latest live value of one series, or None."""
        series = self.store.get(series_labels(name, **labels))
        if series is None:
            return None
        return series.last_value

    def names(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


def series_labels(name: str, **labels: str) -> Labels:
    return labels_from(name, labels)


@contextlib.asynccontextmanager
async def serve_registry(**registry_kwargs: Any) -> AsyncIterator[Daemon]:
    """A ProbeRegistry behind a real unix socket and a real TCP server, its watchdog running."""
    # Imported here: the CUDA tests use this module on machines without the daemon's
    # dependencies (pydantic), and need only `require_module`.
    from aiohttp import web

    from sentinel.collectors.probe_access import ProbeAccess
    from sentinel.collectors.probe_reports import ProbeRegistry

    store, bus = Store(), EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    registry_kwargs.setdefault("access", ProbeAccess.with_tokens(dict.fromkeys(PROBED_WORKERS), tcp=False))
    registry = ProbeRegistry(store, bus, **registry_kwargs)
    app = web.Application()
    app.add_routes(registry.routes())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    # A short directory: a unix socket path has at most 107 bytes.
    directory = tempfile.mkdtemp(prefix="sp-", dir="/tmp")
    sock = os.path.join(directory, "probe.sock")
    await registry.start()
    try:
        await registry.start_unix_site(sock)
        yield Daemon(store, bus, registry, f"unix:{sock}", f"http://127.0.0.1:{port}", sock, events)
    finally:
        await registry.close()
        await runner.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


# -- tests of the helpers --------------------------------------------------------------


def test_missing_module_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.conftest.IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_module("sentinel_no_such_module_for_tests")


def test_missing_module_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.conftest.IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        require_module("sentinel_no_such_module_for_tests")


def test_present_module_is_returned() -> None:
    assert require_module("json").dumps([1]) == "[1]"
