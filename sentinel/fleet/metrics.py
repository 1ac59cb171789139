"""Fleet series into the store: one commit per pass, so series that stop (this host
stopped leading, a pool emptied) get Prometheus staleness markers at once.

The daemon calls `publish(store, coordinator)` from its collector tick (or on a
FleetEvent); it needs nothing else from this package to expose the fleet on /metrics
and to the rule engine.
"""

from __future__ import annotations

from collections.abc import Iterable

from sentinel.fleet.events import FLEET_METRICS, FleetSample
from sentinel.store import Store, now_ms

__all__ = ["SOURCE", "commit", "declare"]

SOURCE = "fleet"


def declare(store: Store) -> None:
    """Register type and help of every fleet series (for /metrics)."""
    for name, (type_, help_) in FLEET_METRICS.items():
        store.set_meta(name, type_, help_)


def commit(store: Store, samples: Iterable[FleetSample], timestamp_ms: int | None = None) -> int:
    """Write one pass of fleet samples; series absent from it are marked stale."""
    appender = store.appender(SOURCE, now_ms() if timestamp_ms is None else timestamp_ms)
    for sample in samples:
        appender.add(sample.name, sample.value, dict(sample.labels))
    return appender.commit()
