"""What goes into the outbox: an alert notice or an action report, as JSON.

A notice is taken from an alert transition at enqueue time (labels, annotations,
times), while the receiver-specific rendering (Block Kit, webhook v4, Alertmanager's
push) happens at send time, so a message sent after an outage still says the truth
about *when* things happened, and an Alertmanager push gets a fresh `endsAt`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import quote_plus

from sentinel.notify.actions import ActionReport
from sentinel.rules.state import Alert, fingerprint

__all__ = [
    "AlertNotice",
    "Notice",
    "Status",
    "decode",
    "encode",
    "format_value",
    "generator_url",
    "notice_from_alert",
    "rfc3339",
]

Status = Literal["firing", "resolved"]


@dataclass(frozen=True)
class AlertNotice:
    """One alert at one moment of its life: firing, or resolved."""

    status: Status
    labels: dict[str, str]  # the alert's labels plus the external labels
    annotations: dict[str, str]
    value: float
    active_at_ms: int  # start of the episode (pending since)
    starts_at_ms: int  # firing since, as Prometheus sends StartsAt = FiredAt
    ends_at_ms: int | None  # the resolution time; None while firing
    generator_url: str

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)

    @property
    def dedup_key(self) -> str:
        """Same alert, same state, same episode: the same notification."""
        return f"{self.fingerprint}:{self.status}:{self.active_at_ms}"


Notice = AlertNotice | ActionReport


def generator_url(external_url: str, expr: str) -> str:
    """Prometheus's link to the expression: `<external_url>graph?g0.expr=...&g0.tab=1`."""
    base = external_url if external_url.endswith("/") else external_url + "/"
    # Go's url.QueryEscape, which Prometheus uses, writes spaces as '+', as quote_plus does.
    return f"{base}graph?g0.expr={quote_plus(expr)}&g0.tab=1"


def notice_from_alert(
    alert: Alert,
    status: Status,
    expr: str,
    external_labels: Mapping[str, str],
    external_url: str,
    at_ms: int,
) -> AlertNotice:
    """The notice of one alert; external labels are added where the alert lacks them, as Prometheus does."""
    labels = {**external_labels, **alert.labels}
    ends = None
    if status == "resolved":
        ends = alert.resolved_at_ms if alert.resolved_at_ms is not None else at_ms
    return AlertNotice(
        status=status,
        labels=labels,
        annotations=dict(alert.annotations),
        value=alert.value,
        active_at_ms=alert.active_at_ms,
        starts_at_ms=alert.fired_at_ms if alert.fired_at_ms is not None else alert.active_at_ms,
        ends_at_ms=ends,
        generator_url=generator_url(external_url, expr),
    )


def encode(notice: Notice) -> str:
    """JSON for the outbox row."""
    if isinstance(notice, ActionReport):
        return json.dumps({"kind": "action", "action": notice.to_json()}, sort_keys=True)
    data = asdict(notice)
    # JSON has no NaN or infinities; the value is only ever shown, so its text is enough.
    data["value"] = repr(notice.value) if not math.isfinite(notice.value) else notice.value
    return json.dumps({"kind": "alert", "alert": data}, sort_keys=True)


def decode(text: str) -> Notice:
    """The notice back from an outbox row; raises ValueError for a row it cannot read."""
    try:
        data = json.loads(text)
        if data["kind"] == "action":
            return ActionReport.from_json(data["action"])
        fields: dict[str, Any] = data["alert"]
        fields["value"] = float(fields["value"])
        return AlertNotice(**fields)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable outbox payload: {exc}") from None


def rfc3339(ms: int) -> str:
    """Milliseconds since the epoch as RFC 3339 in UTC, as Go's encoding of time.Time prints it."""
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def format_value(value: float) -> str:
    """A sample value for people: `3`, `0.7014`, `1.2e+10`, `NaN`."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.6g}"
