"""Pushing alerts to Alertmanager's v2 API the way Prometheus does.

- `POST <url>/api/v2/alerts` with `[{labels, annotations, startsAt, endsAt, generatorURL}]`,
  to each configured Alertmanager independently (one queue each: a dead one does not
  hold back the others).
- Firing alerts are re-sent every `resend_delay` with `endsAt = now + 4 * max(eval
  interval, resend_delay)`, so Alertmanager resolves them by itself if Sentinel dies;
  resolved alerts are sent with `endsAt` = the resolution time and, like Prometheus,
  re-sent during the 15 minutes a resolved alert is kept.
- `endsAt` of a firing alert is computed when the request is made, not when the notice
  was queued: after an outage, a stale `endsAt` would make Alertmanager resolve an
  alert that is still firing.
- The queue is not a history: the latest state of an alert is all Alertmanager needs,
  so a new notice replaces the queued one with the same fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from sentinel.notify.notices import AlertNotice, Notice, decode, notice_from_alert, rfc3339
from sentinel.notify.outbox import Row
from sentinel.notify.secrets import Scrubber
from sentinel.notify.settings import AlertmanagerReceiver
from sentinel.notify.transport import SendResult, post
from sentinel.rules.rulefile import Rule
from sentinel.rules.state import RESOLVED_RETENTION_MS, Alert, AlertState
from sentinel.runtime.clock import wall_clock, wall_time

__all__ = ["ActiveAlerts", "AlertmanagerSink", "Resender", "push_payload", "target_names"]

# Prometheus batches up to 256 alerts per request (notifier.maxBatchSize).
MAX_BATCH = 256

ActiveAlerts = Callable[[], Iterable[tuple[object, Rule, Alert]]]
"""What `RuleManager.active_alerts` returns: (group, rule, alert) of every active alert."""


def target_names(config: AlertmanagerReceiver) -> list[str]:
    """The outbox/metrics name of each URL: the receiver's name, or name@host:port with several URLs."""
    if len(config.urls) == 1:
        return [config.name]
    names: list[str] = []
    for url in config.urls:
        netloc = urlsplit(url).netloc.rpartition("@")[2]  # never the credentials
        name = f"{config.name}@{netloc}"
        names.append(name if name not in names else f"{name}#{len(names)}")
    return names


def valid_for_s(eval_interval_s: float, resend_delay_s: float) -> float:
    """How long a firing alert stays valid in Alertmanager without a re-send: 4 missed sends."""
    return 4 * max(eval_interval_s, resend_delay_s)


def push_payload(
    notices: Sequence[AlertNotice], now_ms: int, valid_for_ms: int, shift_ms: int = 0
) -> list[dict[str, Any]]:
    """The body of `POST /api/v2/alerts`.

    `shift_ms` moves Sentinel's timestamps onto the system clock, which Alertmanager's
    host reads too: after a clock step they differ until Sentinel's clock has caught up
    (`sentinel.runtime.clock`), and an `endsAt` an hour in Alertmanager's past would
    resolve every alert at once.
    """
    out = []
    for n in notices:
        ends = n.ends_at_ms if n.ends_at_ms is not None else now_ms + valid_for_ms
        out.append(
            {
                "labels": n.labels,
                "annotations": n.annotations,
                "startsAt": rfc3339(n.starts_at_ms + shift_ms),
                "endsAt": rfc3339(ends + shift_ms),
                "generatorURL": n.generator_url,
            }
        )
    return out


class AlertmanagerSink:
    """One Alertmanager (one URL of an `alertmanager` receiver)."""

    coalesce = True
    group_wait = 0.0
    min_interval = 0.0

    def __init__(
        self,
        name: str,
        url: str,
        config: AlertmanagerReceiver,
        eval_interval_s: float,
        session: Callable[[], aiohttp.ClientSession],
        scrubber: Scrubber,
        clock: Callable[[], float] = wall_time,
        clock_offset: Callable[[], float] = wall_clock.offset,
    ) -> None:
        self._name = name
        self._url = url.rstrip("/") + "/api/v2/alerts"
        self._config = config
        self._valid_for_ms = int(valid_for_s(eval_interval_s, config.resend_delay) * 1000)
        self._session = session
        self._scrubber = scrubber
        self._clock = clock
        self._clock_offset = clock_offset

    @property
    def name(self) -> str:
        return self._name

    def accepts(self, notice: Notice) -> bool:
        return isinstance(notice, AlertNotice)

    def key(self, notice: Notice) -> str:
        # One row per alert: the latest state replaces a queued older one.
        return notice.fingerprint if isinstance(notice, AlertNotice) else notice.dedup_key

    def take(self, rows: Sequence[Row]) -> list[Row]:
        return list(rows[:MAX_BATCH])

    async def send(self, rows: Sequence[Row]) -> SendResult:
        try:
            notices = [n for n in (decode(r.payload) for r in rows) if isinstance(n, AlertNotice)]
        except ValueError as exc:
            return SendResult(False, error=str(exc), permanent=True)
        shift_ms = int(self._clock_offset() * 1000)
        body = json.dumps(push_payload(notices, int(self._clock() * 1000), self._valid_for_ms, shift_ms)).encode()
        return await post(self._session(), self._url, body, {}, self._config.timeout, self._scrubber)


class Resender:
    """Which alerts of one `alertmanager` receiver are due for a re-send, as Prometheus decides.

    Firing alerts come from the rule manager when it is given (`active_alerts`), so a
    restart of Sentinel keeps re-sending the alerts the rule manager restored; without
    it, from the transitions seen. Resolved alerts are remembered for 15 minutes.
    """

    def __init__(
        self,
        config: AlertmanagerReceiver,
        external_labels: Mapping[str, str],
        external_url: str,
        active_alerts: ActiveAlerts | None = None,
    ) -> None:
        self.config = config
        self._external_labels = dict(external_labels)
        self._external_url = external_url
        self._active_alerts = active_alerts
        self._firing: dict[str, AlertNotice] = {}
        self._resolved: dict[str, AlertNotice] = {}
        self._last_sent: dict[str, float] = {}  # fingerprint -> when last queued, Unix seconds

    def sent(self, notice: AlertNotice, now: float) -> None:
        """A notice of this alert was just queued."""
        fp = notice.fingerprint
        self._last_sent[fp] = now
        if notice.status == "firing":
            self._firing[fp] = notice
            self._resolved.pop(fp, None)
        else:
            self._resolved[fp] = notice
            self._firing.pop(fp, None)

    def due(self, now: float) -> list[AlertNotice]:
        """Alerts whose last send is `resend_delay` old; marks them sent."""
        firing = self._current_firing(now)
        cutoff_ms = now * 1000 - RESOLVED_RETENTION_MS
        for fp in [fp for fp, n in self._resolved.items() if (n.ends_at_ms or 0) < cutoff_ms]:
            del self._resolved[fp]
        candidates = {**firing, **self._resolved}
        for fp in [fp for fp in self._last_sent if fp not in candidates]:
            del self._last_sent[fp]
        out = []
        for fp, notice in candidates.items():
            if self._last_sent.get(fp, float("-inf")) + self.config.resend_delay <= now:
                self._last_sent[fp] = now
                out.append(notice)
        return out

    def _current_firing(self, now: float) -> dict[str, AlertNotice]:
        if self._active_alerts is None:
            return dict(self._firing)
        firing: dict[str, AlertNotice] = {}
        for _group, rule, alert in self._active_alerts():
            if alert.state is not AlertState.FIRING:
                continue
            notice = notice_from_alert(
                alert, "firing", rule.expr, self._external_labels, self._external_url, int(now * 1000)
            )
            if notice.fingerprint not in self._resolved:
                firing[notice.fingerprint] = notice
        self._firing = firing
        return firing
