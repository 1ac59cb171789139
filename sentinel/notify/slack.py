"""Slack incoming webhooks: Block Kit messages for alerts and remediation reports.

Alerts that fire together (queued within `group_wait`) go in one message: a header,
then a section per alert (summary, host, worker, GPU, value, runbook) with a context
line. A remediation report is a message of its own. Slack accepts about one message
a second per webhook; the delivery loop spaces requests by `min_interval` and honours
Retry-After on 429.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from sentinel.notify.actions import ActionReport, describe
from sentinel.notify.notices import AlertNotice, Notice, decode, format_value, rfc3339
from sentinel.notify.outbox import Row
from sentinel.notify.secrets import Scrubber
from sentinel.notify.settings import SlackReceiver
from sentinel.notify.transport import SendResult, header_value, post

__all__ = ["MAX_ALERTS_PER_MESSAGE", "SlackSink", "escape", "host_of", "render_action", "render_alerts"]

# Slack allows 50 blocks a message; each alert takes two (section, context) plus a header.
MAX_ALERTS_PER_MESSAGE = 20
_HEADER_MAX = 150
_SECTION_MAX = 3000
_FIELD_MAX = 2000
_BLOCK_ID_MAX = 255

_OUTCOME_EMOJI = {
    "started": ":hourglass_flowing_sand:",
    "succeeded": ":white_check_mark:",
    "failed": ":x:",
    "skipped": ":fast_forward:",
    "would_act": ":eyes:",
    "needs_human": ":sos:",
}


def escape(text: str) -> str:
    """Slack's mrkdwn needs &, < and > escaped; everything else is literal."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _link(url: str, label: str) -> str:
    """`<url|label>`; the three characters that would end the link early are percent-encoded."""
    safe = url.replace("|", "%7C").replace(">", "%3E").replace("<", "%3C")
    return f"<{safe}|{escape(label)}>"


def host_of(labels: Mapping[str, str], default: str) -> str:
    """The host an alert is about: its host-like label, else `default`."""
    for name in ("host", "hostname", "node", "instance"):
        if labels.get(name):
            return labels[name]
    return default


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _alert_blocks(notice: AlertNotice, key: str, host: str) -> list[dict[str, Any]]:
    labels, notes = notice.labels, notice.annotations
    firing = notice.status == "firing"
    icon = ":red_circle:" if firing else ":large_green_circle:"
    title = f"*{escape(notice.alertname)}*"
    if labels.get("severity"):
        title += f" ({escape(labels['severity'])})"
    lines = [f"{icon} {'' if firing else 'Resolved: '}{title}"]
    summary = notes.get("summary") or notes.get("message")
    if summary:
        lines.append(escape(summary))
    if notes.get("description") and notes.get("description") != summary:
        lines.append(f"_{escape(notes['description'])}_")
    runbook = notes.get("runbook_url") or notes.get("runbook")
    if runbook:
        lines.append(_link(runbook, "Runbook"))
    if not firing and notice.ends_at_ms is not None:
        lines.append(f"Resolved after {_duration((notice.ends_at_ms - notice.starts_at_ms) / 1000)}.")
    fields = [("Host", host_of(labels, host))]
    fields += [(title_, labels[name]) for name, title_ in (("worker", "Worker"), ("gpu", "GPU")) if labels.get(name)]
    fields.append(("Value", format_value(notice.value)))
    section: dict[str, Any] = {
        "type": "section",
        # The dedup key rides along so a reader can tell a repeat from a new alert.
        "block_id": key[:_BLOCK_ID_MAX],
        "text": {"type": "mrkdwn", "text": _cut("\n".join(lines), _SECTION_MAX)},
        "fields": [{"type": "mrkdwn", "text": _cut(f"*{t}*\n{escape(v)}", _FIELD_MAX)} for t, v in fields],
    }
    since = "since" if firing else "fired at"
    context = f"{since} {rfc3339(notice.starts_at_ms)} · {_link(notice.generator_url, 'expression')}"
    return [section, {"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(context, _SECTION_MAX)}]}]


def render_alerts(notices: Sequence[tuple[str, AlertNotice]], host: str) -> dict[str, Any]:
    """One message for (dedup key, notice) pairs: header, then a section and context per alert."""
    firing = [n for _, n in notices if n.status == "firing"]
    resolved = [n for _, n in notices if n.status == "resolved"]
    names = ", ".join(dict.fromkeys(n.alertname for _, n in notices))
    hosts = {host_of(n.labels, host) for _, n in notices}
    where = f" on {next(iter(hosts))}" if len(hosts) == 1 else ""
    if len(notices) == 1:
        header = f"{'Firing' if firing else 'Resolved'}: {names}{where}"
    else:
        parts = [f"{len(firing)} firing" if firing else "", f"{len(resolved)} resolved" if resolved else ""]
        header = f"{', '.join(p for p in parts if p)}{where}: {names}"
    tag = f"[FIRING:{len(firing)}]" if firing else "[RESOLVED]"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(header, _HEADER_MAX), "emoji": True}}
    ]
    for key, notice in notices:
        blocks += _alert_blocks(notice, key, host)
    # `text` is what notifications and screen readers show.
    return {"text": escape(f"{tag} {header}"), "blocks": blocks}


def render_action(report: ActionReport, key: str, host: str) -> dict[str, Any]:
    """One message for a remediation report; its text is the plain sentence of `describe`."""
    sentence = describe(report)
    emoji = _OUTCOME_EMOJI.get(report.outcome, ":wrench:")
    lines = [f"{emoji} {escape(sentence)}"]
    if report.detail and report.outcome == "succeeded":
        lines.append(f"_{escape(report.detail)}_")
    fields = [("Host", host), ("Worker", report.worker), ("Action", report.action), ("Outcome", report.outcome)]
    if report.from_profile or report.to_profile:
        fields.append(("Profile", f"{report.from_profile or '?'} → {report.to_profile or '?'}"))
    context = f"{rfc3339(report.timestamp_ms)} · severity {report.severity}"
    if report.fingerprint:
        context += f" · alert {report.fingerprint}"
    return {
        "text": escape(sentence),
        "blocks": [
            {
                "type": "section",
                "block_id": key[:_BLOCK_ID_MAX],
                "text": {"type": "mrkdwn", "text": _cut("\n".join(lines), _SECTION_MAX)},
                "fields": [{"type": "mrkdwn", "text": _cut(f"*{t}*\n{escape(v)}", _FIELD_MAX)} for t, v in fields],
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": escape(context)}]},
        ],
    }


class SlackSink:
    """One Slack incoming webhook."""

    coalesce = False

    def __init__(
        self,
        config: SlackReceiver,
        url: str,
        session: Callable[[], aiohttp.ClientSession],
        scrubber: Scrubber,
        host: str,
    ) -> None:
        self._config = config
        self._url = url
        self._session = session
        self._scrubber = scrubber
        self._host = host

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def group_wait(self) -> float:
        return self._config.group_wait

    @property
    def min_interval(self) -> float:
        return self._config.min_interval

    def accepts(self, notice: Notice) -> bool:
        if isinstance(notice, AlertNotice):
            return notice.status == "firing" or self._config.send_resolved
        return True

    def key(self, notice: Notice) -> str:
        return notice.dedup_key

    def take(self, rows: Sequence[Row]) -> list[Row]:
        """Leading alert rows up to the message limit; a report (or unreadable row) goes alone."""
        batch: list[Row] = []
        for row in rows[:MAX_ALERTS_PER_MESSAGE]:
            try:
                is_alert = isinstance(decode(row.payload), AlertNotice)
            except ValueError:
                is_alert = False
            if not is_alert:
                return batch or [row]
            batch.append(row)
        return batch

    def render(self, rows: Sequence[Row]) -> dict[str, Any]:
        """The message for rows that `take` put together."""
        notices = [(r.dedup_key, decode(r.payload)) for r in rows]
        first = notices[0][1]
        if isinstance(first, ActionReport):
            return render_action(first, notices[0][0], self._host)
        return render_alerts([(k, n) for k, n in notices if isinstance(n, AlertNotice)], self._host)

    async def send(self, rows: Sequence[Row]) -> SendResult:
        try:
            message = self.render(rows)
        except ValueError as exc:
            return SendResult(False, error=str(exc), permanent=True)
        body = json.dumps(message).encode()
        headers = {"X-Sentinel-Dedup-Key": header_value(",".join(r.dedup_key for r in rows))}
        return await post(self._session(), self._url, body, headers, self._config.timeout, self._scrubber)
