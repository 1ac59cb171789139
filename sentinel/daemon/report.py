"""A readable table of what the daemon sees, printed periodically (`run --report`)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any, TextIO

from sentinel.store.events import Event

if TYPE_CHECKING:
    from sentinel.daemon.core import Daemon

__all__ = ["format_report", "print_reports"]


def _fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}{unit}"


def format_report(
    gpus: list[dict[str, Any]], collectors: list[dict[str, Any]], events: list[Event], elapsed_s: float
) -> str:
    """Render GPUs, collector health and recent events as plain-text tables."""
    lines = [f"--- Sentinel at +{elapsed_s:.0f}s " + "-" * 50]
    lines.append(f"{'GPU':>3}  {'state':<6} {'util':>5} {'mem used':>9} {'temp':>5} {'power':>7}  name")
    for g in gpus:
        lines.append(
            f"{g.get('index', '?'):>3}  {'up' if g.get('up') else 'LOST':<6} "
            f"{_fmt(g.get('utilization'), '%', 100):>5} {_fmt(g.get('memory_used_bytes'), ' GiB', 2**-30, 1):>9} "
            f"{_fmt(g.get('temperature_celsius'), 'C'):>5} {_fmt(g.get('power_watts'), ' W'):>7}  {g.get('name', '')}"
        )
    if not gpus:
        lines.append("  (no GPUs seen)")
    lines.append(
        "collectors: "
        + ", ".join(f"{c['name']}={'up' if c['up'] else 'DOWN (' + str(c['last_error']) + ')'}" for c in collectors)
    )
    if events:
        lines.append("recent events:")
        for e in events:
            stamp = time.strftime("%H:%M:%S", time.localtime(e.timestamp_ms / 1000))
            labels = " ".join(f"{k}={v}" for k, v in sorted(e.labels.items()))
            lines.append(f"  {stamp} {e.kind:<10} {labels}")
    return "\n".join(lines)


async def print_reports(daemon: Daemon, interval_s: float, out: TextIO = sys.stdout, keep: int = 8) -> None:
    """Print a report every `interval_s` (a job of the daemon's scheduler) until cancelled."""
    recent: deque[Event] = deque(maxlen=keep)
    daemon.bus.subscribe(recent.append)
    started = time.monotonic()

    async def report() -> None:
        collectors = [r.health.as_json() for r in daemon.runners.values()]
        text = format_report(daemon.gpus_snapshot(), collectors, list(recent), time.monotonic() - started)
        print(text, file=out, flush=True)
        recent.clear()

    job = daemon.scheduler.add("report", report, interval_s, first_run_in=interval_s)
    try:
        await asyncio.Event().wait()  # until cancelled
    finally:
        if daemon.scheduler.get(job.name) is job:
            daemon.scheduler.remove(job.name)
