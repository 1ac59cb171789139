"""The acting half of the daemon: notifications, remediation and the control API.

Built once the rule manager exists; it subscribes to alert transitions, owns the
worker backends and the control token, and is torn down in the reverse order it was
built, so an action in flight is journaled as interrupted before its backend goes.
With a `fleet:` section it also starts the fleet link (`sentinel.daemon.fleet`): its gate
and group actions go into the engine, and it leaves the fleet after the engine has
stopped (so the slots of actions cut short are given back first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from sentinel.api.control import ControlToken, remediation_routes
from sentinel.config.models import Config
from sentinel.daemon.fleet import FleetLink
from sentinel.notify.actions import ActionReport
from sentinel.notify.dispatcher import Notifier
from sentinel.remediation.backend import LiveControl, WorkerBackend
from sentinel.remediation.backends import build_backend
from sentinel.remediation.engine import Remediator
from sentinel.rules.manager import AlertEvent, RuleManager
from sentinel.runtime.scheduler import Scheduler
from sentinel.runtime.threads import WorkerThreads
from sentinel.runtime.timeouts import wait_for
from sentinel.state.health import StateHealth
from sentinel.store import Store

__all__ = ["HealingStack"]

log = logging.getLogger(__name__)

CLOSE_BUDGET_S = 0.6


def _kill_supervised_child(name: str, backend: WorkerBackend) -> None:
    """Last resort at exit: a supervised child that outlived its stop budget is killed,
    so a stop of Sentinel never leaves an orphaned worker behind."""
    pid = getattr(backend, "pid", None)
    if not getattr(backend, "stop_on_exit", False) or not isinstance(pid, int):
        return
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own process group
        log.warning("killed worker %s (pid %d): it did not stop within the shutdown budget", name, pid)
    except (ProcessLookupError, PermissionError):
        pass


class HealingStack:
    """Notifier, remediator, worker backends and control token of one daemon."""

    def __init__(
        self,
        store: Store,
        state_dir: Path,
        scheduler: Scheduler | None = None,
        health: StateHealth | None = None,
    ) -> None:
        self.store = store
        self.state_dir = state_dir
        self.scheduler = scheduler or Scheduler()
        self.health = health if health is not None else StateHealth()
        # The token file is read here, never in the default executor, which a hung query can fill.
        self._files = WorkerThreads("healing-files", 1)
        self.notifications: Notifier | None = None
        self.remediator: Remediator | None = None
        self.backends: dict[str, WorkerBackend] = {}
        # One token object for the stack's whole life: the routes hold it from the moment
        # they are built (before `start`), so start and reload re-read it in place.
        self._token = ControlToken(None)
        self._config: Config | None = None
        self.fleet: FleetLink | None = None

    @property
    def token(self) -> ControlToken:
        """The control API's token source, the very object the routes check."""
        return self._token

    def routes(self) -> list[web.RouteDef]:
        """Control-API routes; they look the remediator up per request, so reloads reach them."""
        return remediation_routes(lambda: self.remediator, self.token)

    async def start(
        self,
        config: Config,
        rules: RuleManager,
        external_url: str,
        live: LiveControl | None,
        fleet: FleetLink | None = None,
    ) -> None:
        """Build and start everything; raises when a notifier secret (or a fleet credential) is missing."""
        self._config = config
        self.fleet = fleet
        self.notifications = self._build_notifier(config, rules, external_url)
        await self.notifications.start()
        self.backends = {w.name: b for w in config.workers if (b := build_backend(w, self.state_dir)) is not None}
        self.remediator = Remediator(
            config.remediation,
            config.workers,
            self.backends,
            self.store,
            self.state_dir,
            notify=lambda report: self._report_action(report),
            live=live,
            scheduler=self.scheduler,
            health=self.health,
            gates=[fleet.gate] if fleet is not None else (),
            groups=fleet.groups if fleet is not None else None,
        )
        await self.remediator.start()
        if fleet is not None:
            fleet.attach(self.remediator, rules)
            await fleet.start()
        await self._token.reload(config.control.token_file, threads=self._files)
        # Lambdas, not bound methods: a reload may swap the notifier or remediator.
        rules.subscribe(self._on_alert)

    def _build_notifier(self, config: Config, rules: RuleManager, external_url: str) -> Notifier:
        return Notifier(
            config.notify,
            self.store,
            self.state_dir,
            external_url,
            config.rules.external_labels,
            config.rules.interval,
            active_alerts=rules.active_alerts,
            scheduler=self.scheduler,
            health=self.health,
        )

    def _on_alert(self, event: AlertEvent) -> None:
        if self.notifications is not None:
            self.notifications.on_alert(event)
        if self.remediator is not None:
            self.remediator.on_alert(event)

    def _report_action(self, report: ActionReport) -> None:
        if self.notifications is not None:
            self.notifications.report_action(report)

    async def reload(self, new: Config, rules: RuleManager, external_url: str) -> None:
        """Apply a new config: notifier and policy follow it; worker changes need a restart."""
        old = self._config
        self._config = new
        if old is not None and old.fleet != new.fleet:
            log.warning("the fleet section changed: it takes effect when Sentinel restarts")
        if old is not None and old.workers != new.workers:
            log.warning(
                "worker definitions changed: backends and the remediation engine keep the old ones "
                "until Sentinel restarts"
            )
        if self.remediator is not None:
            self.remediator.reconfigure(new.remediation)
        await self.token.reload(new.control.token_file, threads=self._files)
        if old is None or (old.notify, old.rules.external_labels, old.rules.interval) != (
            new.notify,
            new.rules.external_labels,
            new.rules.interval,
        ):
            # Two notifiers must never share the outbox: close the old one first, and
            # bring it back if the new one cannot start (a missing secret).
            if self.notifications is not None:
                await self.notifications.close()
            try:
                self.notifications = self._build_notifier(new, rules, external_url)
                await self.notifications.start()
            except Exception:
                if old is not None:
                    self._config = old
                    self.notifications = self._build_notifier(old, rules, external_url)
                    await self.notifications.start()
                raise

    async def close(self) -> None:
        if self.remediator is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(self.remediator.close(), CLOSE_BUDGET_S)
        if self.fleet is not None:
            await self.fleet.stop()
        for name, backend in self.backends.items():
            try:
                await wait_for(backend.close(), CLOSE_BUDGET_S)
            except Exception as exc:
                log.warning("backend of %s did not close cleanly: %s", name, exc)
                _kill_supervised_child(name, backend)
        if self.notifications is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(self.notifications.close(), CLOSE_BUDGET_S)
