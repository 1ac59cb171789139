"""Generic webhook: Alertmanager's version 4 webhook payload, one alert per POST.

Anything that already consumes Alertmanager webhooks can take Sentinel's directly.
`groupKey` carries the notification's dedup key (Alertmanager uses it the same way: a
receiver deduplicates on it), and so does the `X-Sentinel-Dedup-Key` header. With a
secret configured, `X-Sentinel-Signature: sha256=<hex>` is the HMAC-SHA256 of the exact
body bytes, as GitHub signs its webhooks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from sentinel.notify.actions import ActionReport, describe
from sentinel.notify.notices import AlertNotice, Notice, decode, rfc3339
from sentinel.notify.outbox import Row
from sentinel.notify.secrets import Scrubber
from sentinel.notify.settings import WebhookReceiver
from sentinel.notify.transport import SendResult, header_value, post
from sentinel.rules.state import fingerprint

__all__ = ["ACTION_ALERTNAME", "SIGNATURE_HEADER", "WebhookSink", "sign", "v4_payload"]

SIGNATURE_HEADER = "X-Sentinel-Signature"
DEDUP_HEADER = "X-Sentinel-Dedup-Key"
ACTION_ALERTNAME = "SentinelAction"
# What Alertmanager writes as endsAt of a firing alert: Go's zero time.
_ZERO_TIME = "0001-01-01T00:00:00Z"
# Outcomes after which nobody has to do anything; the rest are shown as firing.
_SETTLED = frozenset({"succeeded", "skipped", "would_act"})


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: `sha256=<hex HMAC-SHA256 of body>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _v4_alert(notice: AlertNotice) -> dict[str, Any]:
    return {
        "status": notice.status,
        "labels": notice.labels,
        "annotations": notice.annotations,
        "startsAt": rfc3339(notice.starts_at_ms),
        "endsAt": rfc3339(notice.ends_at_ms) if notice.ends_at_ms is not None else _ZERO_TIME,
        "generatorURL": notice.generator_url,
        "fingerprint": notice.fingerprint,
    }


def _action_alert(report: ActionReport, external_labels: Mapping[str, str], external_url: str) -> dict[str, Any]:
    labels = {
        **external_labels,
        "alertname": ACTION_ALERTNAME,
        "worker": report.worker,
        "action": report.action,
        "outcome": report.outcome,
        "severity": report.severity,
    }
    annotations = {"summary": describe(report)}
    optional = {
        "description": report.detail,
        "alert": report.alertname,
        "alert_fingerprint": report.fingerprint,
        "from_profile": report.from_profile,
        "to_profile": report.to_profile,
        "seconds_to_healthy": None if report.seconds_to_healthy is None else f"{report.seconds_to_healthy:g}",
    }
    annotations.update({k: v for k, v in optional.items() if v})
    settled = report.outcome in _SETTLED
    return {
        "status": "resolved" if settled else "firing",
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(report.timestamp_ms),
        "endsAt": rfc3339(report.timestamp_ms) if settled else _ZERO_TIME,
        "generatorURL": external_url,
        "fingerprint": fingerprint(labels),
    }


def v4_payload(
    notice: Notice, key: str, receiver: str, external_url: str, external_labels: Mapping[str, str]
) -> dict[str, Any]:
    """Alertmanager's webhook payload (version 4) for one notice."""
    if isinstance(notice, ActionReport):
        alert = _action_alert(notice, external_labels, external_url)
    else:
        alert = _v4_alert(notice)
    return {
        "version": "4",
        "groupKey": key,
        "truncatedAlerts": 0,
        "status": alert["status"],
        "receiver": receiver,
        "groupLabels": {"alertname": alert["labels"]["alertname"]},
        "commonLabels": alert["labels"],
        "commonAnnotations": alert["annotations"],
        "externalURL": external_url,
        "alerts": [alert],
    }


class WebhookSink:
    """One generic webhook receiver."""

    coalesce = False
    group_wait = 0.0
    min_interval = 0.0

    def __init__(
        self,
        config: WebhookReceiver,
        url: str,
        hmac_secret: bytes | None,
        session: Callable[[], aiohttp.ClientSession],
        scrubber: Scrubber,
        external_url: str,
        external_labels: Mapping[str, str],
    ) -> None:
        self._config = config
        self._url = url
        self._secret = hmac_secret
        self._session = session
        self._scrubber = scrubber
        self._external_url = external_url
        self._external_labels = dict(external_labels)

    @property
    def name(self) -> str:
        return self._config.name

    def accepts(self, notice: Notice) -> bool:
        if isinstance(notice, ActionReport):
            return self._config.send_actions
        return notice.status == "firing" or self._config.send_resolved

    def key(self, notice: Notice) -> str:
        return notice.dedup_key

    def take(self, rows: Sequence[Row]) -> list[Row]:
        return [rows[0]]

    def body(self, row: Row) -> bytes:
        """The exact bytes POSTed (and signed) for a row."""
        payload = v4_payload(decode(row.payload), row.dedup_key, self.name, self._external_url, self._external_labels)
        return json.dumps(payload, separators=(",", ":")).encode()

    async def send(self, rows: Sequence[Row]) -> SendResult:
        row = rows[0]
        try:
            body = self.body(row)
        except ValueError as exc:
            return SendResult(False, error=str(exc), permanent=True)
        headers = {DEDUP_HEADER: header_value(row.dedup_key)}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        return await post(self._session(), self._url, body, headers, self._config.timeout, self._scrubber)
