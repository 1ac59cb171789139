"""What the demos share: faults and their results, the printed timeline, the table, and
the default rules copied with compressed `for:` durations.

`sentinel demo` (local.py), `sentinel demo --engine vllm` (vllm.py) and
`sentinel demo --fleet` (fleet.py) play different hosts and engines but report the same
way, so an operator reads one table and one JSON shape whichever demo ran.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import yaml

from sentinel.rules.manager import AlertEvent
from sentinel.rules.state import AlertState

__all__ = [
    "FOR_COMPRESSION",
    "Fault",
    "FaultResult",
    "Timeline",
    "compress_rules",
    "free_port",
    "record_new_actions",
    "repo_rules",
    "results_table",
]

FOR_COMPRESSION = 6
"""The demos divide every rule's `for:` by this, so a fault is detected in seconds."""


@dataclass
class FaultResult:
    fault: str
    injected_at: float | None = None
    detected_at: float | None = None
    alert: str | None = None
    action: str | None = None
    recovered_at: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    alerts: tuple[str, ...]  # any of these firing counts as detection
    expects_action: bool
    timeout_s: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def repo_rules() -> Path:
    rules = Path(__file__).resolve().parents[2] / "rules"  # the checkout's rules/, not the sentinel.rules package
    if not rules.is_dir():
        raise SystemExit(f"sentinel demo: the default rules are not at {rules} (run it from a checkout)")
    return rules


def compress_rules(source: Path, target: Path, factor: int) -> list[str]:
    """Copy the rule files with every `for:` divided by `factor`; returns the new paths."""
    from sentinel.rules.rulefile import parse_prom_duration

    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in sorted(source.glob("*.yml")):
        data = yaml.safe_load(path.read_text())
        for group in data.get("groups", []):
            for rule in group.get("rules", []):
                if rule.get("for"):
                    ms = parse_prom_duration(str(rule["for"])) // factor
                    rule["for"] = f"{max(ms, 1000) // 1000}s" if ms else "0s"
        out = target / path.name
        out.write_text(yaml.safe_dump(data, sort_keys=False))
        paths.append(str(out))
    return paths


@dataclass
class Timeline:
    """Prints what happens as it happens, with seconds since the demo started."""

    started: float
    out: TextIO
    quiet: bool
    firing: list[tuple[float, str, dict[str, str]]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    def say(self, what: str) -> None:
        # With --json the timeline goes to stderr, so stdout stays one JSON object.
        print(f"  +{self.now():6.1f}s  {what}", file=sys.stderr if self.quiet else self.out, flush=True)

    def on_alert(self, event: AlertEvent) -> None:
        t = event.transition
        labels = {k: v for k, v in t.alert.labels.items() if k in ("worker", "gpu", "xid")}
        shown = " ".join(f"{k}={v}" for k, v in sorted(labels.items()))
        if t.current is AlertState.FIRING:
            self.firing.append((self.now(), event.rule.name, dict(t.alert.labels)))
            self.say(f"FIRING    {event.rule.name} {shown}")
        elif t.current is AlertState.INACTIVE and t.previous is AlertState.FIRING:
            self.say(f"resolved  {event.rule.name} {shown}")


class _ActionLog(Protocol):
    async def actions_json(self, limit: int, worker: str | None = None) -> list[dict[str, Any]]: ...


async def record_new_actions(
    remediator: _ActionLog | None,
    worker: str,
    wall_since: float,
    seen: set[int],
    actions: list[dict[str, Any]],
    timeline: Timeline,
) -> dict[str, Any] | None:
    """Journal rows of `worker` started since `wall_since`: each finished one is recorded
    once (into `actions`, and said on the timeline); returns the first that succeeded, else
    the first at all, else None. `notify_only` is not an action here."""
    if remediator is None:
        return None
    rows = await remediator.actions_json(limit=20, worker=worker)
    mine = [r for r in rows if r["started"] >= wall_since and r["action"] != "notify_only"]
    for row in sorted(mine, key=lambda r: r["started"]):
        key = int(row["id"] or 0)
        if key not in seen and row.get("outcome") is not None:
            seen.add(key)
            actions.append(row)
            detail = f" ({row['profile_before']} -> {row['profile_after']})" if row["profile_after"] else ""
            healthy = row.get("seconds_to_healthy")
            after = f", healthy after {healthy:.1f}s" if healthy is not None else ""
            timeline.say(f"ACTION    {row['action']} {worker}{detail}: {row['outcome']}{after}")
    succeeded = [r for r in mine if r.get("outcome") == "succeeded"]
    if succeeded:
        return succeeded[0]
    return mine[0] if mine else None


def results_table(results: Sequence[FaultResult]) -> str:
    """The demo's summary: one row per fault, times in seconds since the demo started."""

    def cell(v: float | str | None) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}s" if isinstance(v, float) else v

    head = ("fault", "injected", "detected", "alert", "action", "recovered", "note")
    rows = [head] + [
        (r.fault, cell(r.injected_at), cell(r.detected_at), cell(r.alert), cell(r.action), cell(r.recovered_at), r.note)
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
