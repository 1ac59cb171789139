"""The notifier's own series in the store: notifications by outcome, queue lengths, latency.

Counters are kept here and written to the store as absolute values, on every change
and on a timer, so they stay within the store's lookback (and its retention) while
nothing happens, and a rule can alert on `increase(sentinel_notifications_total{outcome="dropped"}[5m])`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sentinel.store import Store, now_ms

__all__ = ["OUTCOMES", "NotifyMetrics"]

OUTCOMES = ("sent", "failed", "dropped", "expired")

NOTIFICATIONS = "sentinel_notifications_total"
QUEUE_LENGTH = "sentinel_notification_queue_length"
LATENCY = "sentinel_notification_latency_seconds"


class NotifyMetrics:
    """Counters and gauges of every receiver, published to the store."""

    def __init__(self, store: Store, receivers: Iterable[str], lengths: Callable[[], dict[str, int]]) -> None:
        self._store = store
        self._lengths = lengths
        self._receivers = list(receivers)
        # Every (receiver, outcome) starts at 0, so `increase()` sees the first event.
        self._counts: dict[tuple[str, str], float] = {(r, o): 0.0 for r in self._receivers for o in OUTCOMES}
        self._latency: dict[str, float] = {}
        store.set_meta(
            NOTIFICATIONS,
            "counter",
            "Notifications by outcome: sent and dropped/expired count notifications, failed counts tries.",
        )
        store.set_meta(QUEUE_LENGTH, "gauge", "Notifications waiting in the outbox for the receiver.")
        store.set_meta(
            LATENCY, "gauge", "Delay between enqueueing and delivery of the receiver's last delivered notification."
        )

    def count(self, receiver: str, outcome: str, n: int = 1) -> None:
        """Add `n` to one outcome's counter (n=0 is allowed and ignored)."""
        if n:
            self._counts[(receiver, outcome)] = self._counts.get((receiver, outcome), 0.0) + n

    def delivered(self, receiver: str, n: int, latency_s: float) -> None:
        """`n` notifications accepted by the receiver, the oldest `latency_s` after it was enqueued."""
        self.count(receiver, "sent", n)
        self._latency[receiver] = max(0.0, latency_s)

    def value(self, receiver: str, outcome: str) -> float:
        return self._counts.get((receiver, outcome), 0.0)

    def publish(self) -> None:
        """Write the current values to the store."""
        ts = now_ms()
        lengths = self._lengths()
        for (receiver, outcome), value in self._counts.items():
            self._store.add(NOTIFICATIONS, value, {"receiver": receiver, "outcome": outcome}, ts)
        for receiver in self._receivers:
            self._store.add(QUEUE_LENGTH, lengths.get(receiver, 0), {"receiver": receiver}, ts)
        for receiver, latency in self._latency.items():
            self._store.add(LATENCY, latency, {"receiver": receiver}, ts)
