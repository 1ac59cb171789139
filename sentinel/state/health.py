"""What could not be kept on disk, counted and said once: the health of the state directory.

Every store in the state directory reports here: the remediation journal (`journal`),
the notification outbox (`outbox`) and the alert state (`alert_state`). None of them
stops Sentinel when the disk misbehaves (issue 15, build item 6); each keeps detecting
and alerting in a degraded mode and says so:

- a file that cannot be opened (read-only or missing directory, no space at creation):
  the store runs on an in-memory database until Sentinel restarts;
- a corrupt file, or one written by a newer Sentinel: moved aside (renamed, never
  deleted) and replaced by a fresh one;
- a write that fails at run time (disk full): the journal and the outbox hold what they
  could not write in memory, bounded, and write it once the disk works again.

Each change is logged once (the first failure, a different error, the recovery), never
per write, and exported by the daemon's `self` collector:

- `sentinel_state_degraded{store}`: 1 while the store keeps something only in memory;
- `sentinel_state_write_failures_total{store}`: writes that failed;
- `sentinel_state_unsaved{store}`: items held in memory, waiting for the disk;
- `sentinel_state_lost_total{store}`: items given up on (beyond the in-memory bound);
- `sentinel_state_files_moved_aside_total{store}`: files renamed because they were
  corrupt or unreadable.

The `SentinelStateDegraded` and `SentinelStateFileMovedAside` rules alert on them.
Methods are thread-safe: stores call them from their own threads.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sentinel.store import Appender, Store

__all__ = ["STATE_METRICS", "StateHealth", "StoreHealth"]

log = logging.getLogger(__name__)

STATE_METRICS = (
    ("sentinel_state_degraded", "gauge", "1 while the state store keeps something only in memory (see the log)."),
    ("sentinel_state_write_failures_total", "counter", "Writes to the state store that failed."),
    ("sentinel_state_unsaved", "gauge", "Items held in memory because the state store could not write them yet."),
    ("sentinel_state_lost_total", "counter", "Items the state store gave up on (beyond its in-memory bound)."),
    (
        "sentinel_state_files_moved_aside_total",
        "counter",
        "State files renamed and replaced by a fresh one because they were corrupt or unreadable.",
    ),
)


@dataclass
class StoreHealth:
    """One store's counters and condition."""

    durable: bool = True  # False: running on an in-memory database
    failing: str | None = None  # the error of the last write, while writes fail
    problem: str | None = None  # why not durable
    write_failures_total: int = 0
    unsaved: int = 0
    lost_total: int = 0
    moved_aside_total: int = 0

    @property
    def degraded(self) -> bool:
        return not self.durable or self.failing is not None or self.unsaved > 0

    def as_json(self) -> dict[str, Any]:
        return {
            "degraded": self.degraded,
            "durable": self.durable,
            "problem": self.problem,
            "failing": self.failing,
            "write_failures_total": self.write_failures_total,
            "unsaved": self.unsaved,
            "lost_total": self.lost_total,
            "moved_aside_total": self.moved_aside_total,
        }


class StateHealth:
    """The condition of every state store (module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[str, StoreHealth] = {}

    def store(self, name: str) -> StoreHealth:
        """A copy of one store's condition (created at its defaults when new)."""
        with self._lock:
            health = self._stores.setdefault(name, StoreHealth())
            return StoreHealth(**vars(health))

    def opened(self, name: str, path: Path, *, durable: bool, problem: str | None = None) -> None:
        """A store opened its file (or, not durable, an in-memory stand-in because of `problem`)."""
        with self._lock:
            health = self._stores.setdefault(name, StoreHealth())
            health.durable, health.problem = durable, problem
        if not durable:
            log.error(
                "%s: cannot use %s (%s); keeping it in memory only: detection, alerting and remediation go on, "
                "but nothing of it survives a restart (sentinel_state_degraded{store=%r} is 1)",
                name,
                path,
                problem,
                name,
            )

    def moved_aside(self, name: str, path: Path, moved_to: Path, reason: str) -> None:
        """A corrupt or unreadable file was renamed and a fresh one started."""
        with self._lock:
            self._stores.setdefault(name, StoreHealth()).moved_aside_total += 1
        log.error(
            "%s: %s is unusable (%s); moved it aside to %s and started a fresh one. Sentinel keeps watching; "
            "what the old file held (history, queued items) is not used.",
            name,
            path,
            reason,
            moved_to,
        )

    def write_failed(self, name: str, what: str, error: BaseException | str) -> None:
        """A write failed; logged when writes start failing or the error changes."""
        message = str(error) or type(error).__name__
        with self._lock:
            health = self._stores.setdefault(name, StoreHealth())
            health.write_failures_total += 1
            news = health.failing != message
            health.failing = message
        if news:
            log.error(
                "%s: cannot write %s: %s; holding what could not be written in memory and retrying "
                "(counted in sentinel_state_write_failures_total; logged again only when this changes)",
                name,
                what,
                message,
            )

    def write_ok(self, name: str) -> None:
        """A write succeeded; logs the recovery after failures."""
        with self._lock:
            health = self._stores.setdefault(name, StoreHealth())
            was, health.failing = health.failing, None
            failures = health.write_failures_total
        if was is not None:
            log.warning("%s: writes work again (after %d failed write(s) in all)", name, failures)

    def set_unsaved(self, name: str, count: int) -> None:
        with self._lock:
            self._stores.setdefault(name, StoreHealth()).unsaved = count

    def lost(self, name: str, count: int, what: str) -> None:
        """`count` items were given up on; always logged (they are gone)."""
        if count <= 0:
            return
        with self._lock:
            self._stores.setdefault(name, StoreHealth()).lost_total += count
        log.error(
            "%s: gave up on %d %s that could not be written (counted in sentinel_state_lost_total)", name, count, what
        )

    def snapshot(self) -> dict[str, StoreHealth]:
        with self._lock:
            return {name: StoreHealth(**vars(h)) for name, h in self._stores.items()}

    def declare(self, store: Store) -> None:
        """Set the metadata of the state series in `store`."""
        for name, type_, help_ in STATE_METRICS:
            store.set_meta(name, type_, help_)

    def publish(self, out: Appender) -> None:
        """Write every store's series into one collector pass."""
        for name, health in sorted(self.snapshot().items()):
            out.add("sentinel_state_degraded", 1.0 if health.degraded else 0.0, store=name)
            out.add("sentinel_state_write_failures_total", health.write_failures_total, store=name)
            out.add("sentinel_state_unsaved", health.unsaved, store=name)
            out.add("sentinel_state_lost_total", health.lost_total, store=name)
            out.add("sentinel_state_files_moved_aside_total", health.moved_aside_total, store=name)
