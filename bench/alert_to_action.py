"""Firing alert to action started, and to notification received: p50 / p99.

A real Remediator (act mode, SQLite journal) and a real Notifier (durable outbox) get
each firing transition as the daemon's HealingStack hands it over; the worker backend
records when its `restart` verb is called, and a local webhook receiver when the
notification arrives. Baseline in the same run: a plain asyncio hop (call_soon to a
callback), the floor of any in-process hand-over. Target: p99 <= 100 ms to action start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

from sentinel.config.models import WorkerConfig
from sentinel.notify.dispatcher import Notifier
from sentinel.notify.settings import NotifyConfig, WebhookReceiver
from sentinel.notify.testing import RecordingReceiver, alert_event
from sentinel.remediation.backend import ActionContext, UnitState
from sentinel.remediation.engine import Remediator
from sentinel.remediation.settings import CircuitBreakerConfig, Profile, RemediationConfig
from sentinel.store import Store


class TimingBackend:
    """A worker backend that notes when each verb is called and returns at once."""

    def __init__(self, started: dict[str, float], store: Store, name: str) -> None:
        self._started, self._store, self._name = started, store, name

    async def start(self, profile: Profile, ctx: ActionContext) -> None:
        return None

    async def stop(self, ctx: ActionContext) -> None:
        return None

    async def restart(self, profile: Profile, ctx: ActionContext) -> None:
        self._started[ctx.fingerprint] = time.monotonic()
        # The worker is healthy again at once, so verification ends quickly.
        self._store.add("sentinel_endpoint_up", 1.0, {"worker": self._name})
        self._store.add("sentinel_endpoint_stalled", 0.0, {"worker": self._name})

    async def state(self) -> UnitState:
        return UnitState("active")

    async def close(self) -> None:
        return None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(alerts: int) -> None:
    store = Store()
    started: dict[str, float] = {}
    workers = [WorkerConfig(name=f"w{i}", endpoint="http://127.0.0.1:9") for i in range(alerts)]
    backends = {w.name: TimingBackend(started, store, w.name) for w in workers}
    policy = RemediationConfig(
        mode="act",
        cooldown=0,
        max_concurrent=alerts,
        circuit_breaker=CircuitBreakerConfig(max_ratio=1.0),
        verify_timeout=5,
        verify_interval=0.05,
    )
    with tempfile.TemporaryDirectory() as tmp:
        async with RecordingReceiver() as sink:
            notify = NotifyConfig(webhook=(WebhookReceiver(name="sink", url=sink.url),))
            notifier = Notifier(notify, store, Path(tmp), "http://127.0.0.1:9847/", {}, 1.0)
            await notifier.start()
            remediator = Remediator(policy, workers, backends, store, Path(tmp), notify=notifier.report_action)
            await remediator.start()
            sent: dict[str, float] = {}
            to_action: list[float] = []
            to_notice: list[float] = []
            parsed: list[object] = []
            arrivals: dict[str, float] = {}  # worker -> when its firing alert reached the sink
            for i in range(alerts):
                event = alert_event("EngineStalled", {"worker": f"w{i}", "action": "restart"})
                fingerprint = event.alert.fingerprint
                sent[fingerprint] = time.monotonic()
                notifier.on_alert(event)
                remediator.on_alert(event)

                worker = f"w{i}"
                while fingerprint not in started or worker not in arrivals:
                    for request in sink.accepted()[len(parsed) :]:
                        parsed.append(request)
                        body = request.json()
                        if body.get("status") == "firing":
                            for a in body.get("alerts", []):
                                arrivals.setdefault(a.get("labels", {}).get("worker", ""), request.at)
                    await asyncio.sleep(0.0005)
                to_action.append(started[fingerprint] - sent[fingerprint])
                to_notice.append(arrivals[worker] - sent[fingerprint])
                await asyncio.sleep(0.02)
            await remediator.close()
            await notifier.close()
    loop = asyncio.get_running_loop()
    hops: list[float] = []
    for _ in range(alerts):
        done = loop.create_future()
        t0 = time.monotonic()
        loop.call_soon(done.set_result, None)
        await done
        hops.append(time.monotonic() - t0)
    print(f"machine: {platform.machine()} python {platform.python_version()}; {alerts} alerts, one per worker")
    for name, values in (
        ("firing -> action started", to_action),
        ("firing -> webhook received", to_notice),
        ("baseline: one event-loop hop", hops),
    ):
        print(f"{name:30s} p50 {statistics.median(values) * 1000:8.2f} ms   p99 {pct(values, 0.99) * 1000:8.2f} ms")
    ratio = statistics.median(to_action) / statistics.median(hops)
    print(
        f"action start / loop hop (p50): {ratio:.0f}x; target p99 <= 100 ms to action start: "
        f"{'met' if pct(to_action, 0.99) <= 0.1 else 'MISSED'}"
    )


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # the remediator logs every action at warning
    parser = argparse.ArgumentParser()
    parser.add_argument("--alerts", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(run(args.alerts))


if __name__ == "__main__":
    main()
