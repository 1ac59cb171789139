"""The notifier: turns alert transitions and remediation reports into outbox rows, and runs delivery.

    notifier = Notifier(config.notify, store, state_dir, external_url, external_labels, eval_interval_s,
                        active_alerts=rules.active_alerts)
    await notifier.start()
    rules.subscribe(notifier.on_alert)
    notifier.report_action(ActionReport(...))
    await notifier.close()

`on_alert` and `report_action` are called on the event loop and return at once; what
they hand over in one loop iteration is written to the outbox in one transaction (one
fsync for a burst of alerts) by the outbox's thread, and `report_action`'s future
resolves once its rows are on disk. Only firing and resolved transitions notify.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp

from sentinel.notify.actions import ActionReport
from sentinel.notify.alertmanager import ActiveAlerts, AlertmanagerSink, Resender, target_names
from sentinel.notify.delivery import Deliverer, Sink
from sentinel.notify.metrics import NotifyMetrics
from sentinel.notify.notices import AlertNotice, Notice, Status, encode, notice_from_alert
from sentinel.notify.outbox import EnqueueResult, Item, Outbox
from sentinel.notify.secrets import Scrubber, SecretError, read_secret
from sentinel.notify.settings import NotifyConfig
from sentinel.notify.slack import SlackSink, host_of
from sentinel.notify.transport import USER_AGENT
from sentinel.notify.webhook import WebhookSink
from sentinel.rules.manager import AlertEvent
from sentinel.rules.state import AlertState
from sentinel.runtime.clock import wall_time
from sentinel.runtime.scheduler import Job, Scheduler
from sentinel.runtime.threads import WorkerThreads
from sentinel.state.health import StateHealth
from sentinel.store import Store

__all__ = ["OUTBOX_FILE", "NotifyConfigError", "Notifier"]

log = logging.getLogger(__name__)

OUTBOX_FILE = "notifications.sqlite"
PUBLISH_EVERY_S = 10.0
# Loggers the scrubber filters: the notifier's own, and aiohttp's client side.
_FILTERED_LOGGERS = (
    "sentinel.notify",
    *(
        f"sentinel.notify.{m}"
        for m in ("dispatcher", "delivery", "outbox", "slack", "webhook", "alertmanager", "transport")
    ),
    "aiohttp.client",
)


class NotifyConfigError(Exception):
    """Receivers that cannot start (a secret file missing); the message lists every problem."""


def _status(event: AlertEvent) -> Status | None:
    t = event.transition
    if t.current is AlertState.FIRING:
        return "firing"
    if t.previous is AlertState.FIRING and t.current is AlertState.INACTIVE:
        return "resolved"
    return None  # pending, or a pending alert that vanished: nobody was told about it


class Notifier:
    """Owns the outbox, the receivers and their delivery loops."""

    def __init__(
        self,
        config: NotifyConfig,
        store: Store,
        state_dir: Path,
        external_url: str,
        external_labels: Mapping[str, str],
        eval_interval_s: float,
        *,
        active_alerts: ActiveAlerts | None = None,
        hostname: str | None = None,
        clock: Callable[[], float] = wall_time,
        rng: random.Random | None = None,
        scheduler: Scheduler | None = None,
        health: StateHealth | None = None,
    ) -> None:
        self.config = config
        self.external_url = external_url
        self.external_labels = dict(external_labels)
        self.eval_interval_s = eval_interval_s
        self.hostname = hostname or socket.gethostname()
        self.scrubber = Scrubber()
        self.outbox = Outbox(state_dir / OUTBOX_FILE, config.outbox.max_length, clock=clock, health=health)
        self._clock = clock
        self._scheduler = scheduler or Scheduler()
        self._rng = rng or random.Random()
        self._resenders = [
            Resender(am, self.external_labels, external_url, active_alerts) for am in config.alertmanager
        ]
        self.metrics = NotifyMetrics(store, self.receivers(), self.outbox.lengths)
        self._deliverers: dict[str, Deliverer] = {}
        self._am_targets: list[list[Sink]] = []  # per alertmanager receiver, one sink per URL
        self._session: aiohttp.ClientSession | None = None
        self._pending: list[tuple[Notice, asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self._writes: set[asyncio.Task[None]] = set()
        self._overflowing: dict[str, int] = {}  # receiver -> rows dropped since the queue overflowed
        self._ticker: Job | None = None
        self._started = False
        self._closed = False
        self._last_publish = float("-inf")

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Read the secrets, open the outbox and start delivering (including rows from before)."""
        # Its own thread: the default executor may be full of hung queries (issue 15, F4).
        secrets = await WorkerThreads("notify-secrets", 1).run(self._read_secrets)
        for logger in _FILTERED_LOGGERS:
            logging.getLogger(logger).addFilter(self.scrubber)
        await self.outbox.open()
        self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}, trust_env=self.config.proxy_from_env)
        for sink in self._build_sinks(secrets):
            deliverer = Deliverer(
                sink,
                self.outbox,
                self.metrics,
                self.config.outbox,
                self.scrubber,
                rng=self._rng,
                clock=self._clock,
                scheduler=self._scheduler,
            )
            self._deliverers[sink.name] = deliverer
            await deliverer.start()
        self._report_orphans()
        self._started = True
        self.metrics.publish()
        step = min([max(self.eval_interval_s, 1.0), *(r.config.resend_delay for r in self._resenders)])
        self._ticker = self._scheduler.add("notify:ticker", self._tick, step)
        if self._pending:
            self._schedule_flush()

    async def close(self) -> None:
        """Finish writing what was handed over, stop delivery, close the outbox. Queued rows stay."""
        if self._closed:
            return
        self._closed = True
        if self._ticker is not None:
            ticker, self._ticker = self._ticker, None
            if self._scheduler.get(ticker.name) is ticker:
                self._scheduler.remove(ticker.name)
            await ticker.stop()
        if self._started:
            await self.flush()
        await asyncio.gather(*(d.stop() for d in self._deliverers.values()))
        if self._session is not None:
            await self._session.close()
        await self.outbox.close()
        self.metrics.publish()
        for logger in _FILTERED_LOGGERS:
            logging.getLogger(logger).removeFilter(self.scrubber)
        for _notice, future in self._pending:
            if not future.done():
                future.set_result(None)
        self._pending.clear()

    def _session_get(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the notifier is not started")
        return self._session

    def _read_secrets(self) -> dict[str, tuple[str, bytes | None]]:
        """(url, hmac secret) of each Slack and webhook receiver; every problem reported together."""
        out: dict[str, tuple[str, bytes | None]] = {}
        problems: list[str] = []
        for slack in self.config.slack:
            try:
                url = read_secret(f"slack {slack.name!r} url", slack.url, slack.url_file, slack.url_env)
                self.scrubber.add(url)
                out[slack.name] = (url, None)
            except SecretError as exc:
                problems.append(str(exc))
        for hook in self.config.webhook:
            try:
                url = read_secret(f"webhook {hook.name!r} url", hook.url, hook.url_file, hook.url_env)
                self.scrubber.add(url)
                key = None
                if hook.hmac_secret_file or hook.hmac_secret_env:
                    text = read_secret(
                        f"webhook {hook.name!r} hmac secret", None, hook.hmac_secret_file, hook.hmac_secret_env
                    )
                    self.scrubber.add(text)
                    key = text.encode()
                out[hook.name] = (url, key)
            except SecretError as exc:
                problems.append(str(exc))
        for am in self.config.alertmanager:
            for url in am.urls:
                self.scrubber.add_credentials(url)
        if problems:
            raise NotifyConfigError("notification receivers cannot start:\n  " + "\n  ".join(problems))
        return out

    def _build_sinks(self, secrets: Mapping[str, tuple[str, bytes | None]]) -> list[Sink]:
        sinks: list[Sink] = []
        for slack in self.config.slack:
            url, _ = secrets[slack.name]
            host = host_of(self.external_labels, self.hostname)
            sinks.append(SlackSink(slack, url, self._session_get, self.scrubber, host))
        for hook in self.config.webhook:
            url, key = secrets[hook.name]
            sinks.append(
                WebhookSink(hook, url, key, self._session_get, self.scrubber, self.external_url, self.external_labels)
            )
        for am in self.config.alertmanager:
            targets: list[Sink] = [
                AlertmanagerSink(name, url, am, self.eval_interval_s, self._session_get, self.scrubber, self._clock)
                for name, url in zip(target_names(am), am.urls, strict=True)
            ]
            self._am_targets.append(targets)
            sinks += targets
        return sinks

    def _report_orphans(self) -> None:
        for receiver, length in self.outbox.lengths().items():
            if length and receiver not in self._deliverers:
                log.warning(
                    "notify: %d notification(s) queued for receiver %r, which is no longer configured; "
                    "they stay in %s until it is configured again",
                    length,
                    receiver,
                    self.outbox.path,
                )

    # -- input ------------------------------------------------------------------------

    def on_alert(self, event: AlertEvent) -> None:
        """RuleManager subscriber: queue firing and resolved transitions (pending ones are ignored).

        Called on the event loop; returns at once (`flush()` waits for the disk).
        """
        status = _status(event)
        if status is None:
            return
        notice = notice_from_alert(
            event.alert,
            status,
            event.rule.expr,
            self.external_labels,
            self.external_url,
            event.transition.timestamp_ms,
        )
        self._submit(notice)

    def report_action(self, report: ActionReport) -> asyncio.Future[None]:
        """Queue a remediation report for Slack and webhooks (not Alertmanager).

        Call it on the event loop; it returns at once. Awaiting the future is optional:
        it resolves once the report is on disk (or was counted as dropped).
        """
        return self._submit(report)

    async def flush(self) -> None:
        """Wait until everything handed over so far is in the outbox."""
        while self._pending or self._writes:
            if self._pending and self._started:
                self._flush_now()
            if self._writes:
                await asyncio.gather(*list(self._writes), return_exceptions=True)
            elif self._pending:  # not started: nothing can be written yet
                return

    def queue_lengths(self) -> dict[str, int]:
        """Notifications waiting per receiver."""
        lengths = self.outbox.lengths()
        return {name: lengths.get(name, 0) for name in self.receivers()}

    def receivers(self) -> list[str]:
        """Names of every receiver queue, as in the `receiver` label (each Alertmanager URL is one)."""
        names = [r.name for r in self.config.slack] + [r.name for r in self.config.webhook]
        return names + [n for am in self.config.alertmanager for n in target_names(am)]

    def deliverer(self, receiver: str) -> Deliverer:
        """The delivery loop of one receiver (state for diagnostics: failures, last_error)."""
        return self._deliverers[receiver]

    # -- writing ------------------------------------------------------------------------

    def _submit(self, notice: Notice) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            for item in self._route(notice, self._clock()) if self._started else []:
                self.metrics.count(item.receiver, "dropped")
            log.error("notify: the notifier is closed; dropped %s", _what(notice))
            future.set_result(None)
            return future
        self._pending.append((notice, future))
        self._schedule_flush()
        return future

    def _schedule_flush(self) -> None:
        if self._started and not self._flush_scheduled:
            self._flush_scheduled = True
            # call_soon: every notice handed over in this loop iteration shares one transaction.
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        now = self._clock()
        items: list[Item] = []
        for notice, _ in batch:
            items += self._route(notice, now)
        task = asyncio.get_running_loop().create_task(self._write(items, [f for _, f in batch]))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def _route(self, notice: Notice, now: float) -> list[Item]:
        payload = encode(notice)
        # Alertmanager targets are fed below, through their receiver's resend bookkeeping.
        items = [
            Item(d.name, d.sink.key(notice), payload, d.sink.coalesce)
            for d in self._deliverers.values()
            if d.sink.accepts(notice) and not d.sink.coalesce
        ]
        if isinstance(notice, AlertNotice):
            for resender, targets in zip(self._resenders, self._am_targets, strict=True):
                resender.sent(notice, now)
                items += [Item(t.name, t.key(notice), payload, coalesce=True) for t in targets]
        return items

    async def _write(self, items: list[Item], futures: list[asyncio.Future[None]]) -> None:
        if not items:  # no receiver wants it
            for future in futures:
                if not future.done():
                    future.set_result(None)
            return
        try:
            result = await self.outbox.enqueue(items)
        except Exception as exc:
            # Nowhere durable to put them: count and say so, never drop silently.
            for item in items:
                self.metrics.count(item.receiver, "dropped")
            log.error("notify: cannot write %d notification(s) to the outbox: %s", len(items), exc)
        else:
            self._account(result)
            for receiver in {i.receiver for i in items}:
                if receiver in self._deliverers:
                    self._deliverers[receiver].wake()
        finally:
            for future in futures:
                if not future.done():
                    future.set_result(None)
        self.metrics.publish()

    def _account(self, result: EnqueueResult) -> None:
        for receiver, dropped in result.dropped.items():
            self.metrics.count(receiver, "dropped", dropped)
            if receiver not in self._overflowing:
                log.warning(
                    "notify %s: queue full (%d); dropping the oldest notifications, counted in "
                    'sentinel_notifications_total{outcome="dropped"}',
                    receiver,
                    self.outbox.max_length,
                )
                self._overflowing[receiver] = 0
            self._overflowing[receiver] += dropped

    # -- periodic ---------------------------------------------------------------------

    async def _tick(self) -> None:
        """Re-send to Alertmanager as Prometheus does, and keep the metrics fresh in the store."""
        try:
            now = self._clock()
            self._resend(now)
            self._check_overflow()
            if now - self._last_publish >= PUBLISH_EVERY_S:
                self.metrics.publish()
                self._last_publish = now
        except Exception as exc:  # a guard per tick, scrubbed: re-sends must go on
            log.error("notify: periodic work failed: %s", self.scrubber.scrub(str(exc)))

    def _resend(self, now: float) -> None:
        """Queue the Alertmanager re-sends that are due, all in one transaction."""
        items: list[Item] = []
        for resender, targets in zip(self._resenders, self._am_targets, strict=True):
            for notice in resender.due(now):
                # Only this receiver's Alertmanagers: Slack and webhooks do not repeat.
                payload = encode(notice)
                items += [Item(t.name, t.key(notice), payload, coalesce=True) for t in targets]
        if items and not self._closed:
            task = asyncio.get_running_loop().create_task(self._write(items, []))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def _check_overflow(self) -> None:
        for receiver, dropped in list(self._overflowing.items()):
            if self.outbox.length(receiver) < self.outbox.max_length:
                log.info("notify %s: queue back under its bound after dropping %d notification(s)", receiver, dropped)
                del self._overflowing[receiver]


def _what(notice: Notice) -> str:
    if isinstance(notice, AlertNotice):
        return f"{notice.status} {notice.alertname}"
    return f"action {notice.action} on {notice.worker} ({notice.outcome})"
