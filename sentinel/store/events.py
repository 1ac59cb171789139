"""In-process event bus: sources publish, subscribers hear at once.

An event is something that happened at an instant (an Xid, a log line matching a
pattern), as opposed to a sampled value. Subscribers are plain callables run on the
event loop's thread in publication order; a thread (the NVML Xid waiter, a log reader)
publishes through `publish_threadsafe`, which hops onto the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sentinel.store.series import now_ms

__all__ = ["Event", "EventBus", "Subscriber"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One occurrence. `metrics` names the store series the source updated for it,
    so the rule engine can re-evaluate exactly the groups that read them."""

    kind: str
    source: str
    labels: Mapping[str, str] = field(default_factory=dict)
    value: float | None = None
    message: str = ""
    timestamp_ms: int = field(default_factory=now_ms)
    metrics: tuple[str, ...] = ()


Subscriber = Callable[[Event], None]


class EventBus:
    """Fan-out of events to subscribers; a failing subscriber never blocks the others."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.published_total = 0

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Name the loop that `publish_threadsafe` hands events to."""
        self._loop = loop

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Register a subscriber; returns a function that unsubscribes it."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(self, event: Event) -> None:
        """Deliver now, on the calling (event loop) thread."""
        self.published_total += 1
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:  # one broken subscriber must not starve the rest
                log.exception("event subscriber %r failed on %s", subscriber, event.kind)

    def publish_threadsafe(self, event: Event) -> None:
        """Deliver from another thread; falls back to a direct call without a loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.publish(event)
            return
        loop.call_soon_threadsafe(self.publish, event)

    def queue(self, maxsize: int = 0) -> tuple[asyncio.Queue[Event], Callable[[], None]]:
        """An asyncio queue fed by the bus (for async consumers); returns (queue, unsubscribe)."""
        q: asyncio.Queue[Event] = asyncio.Queue(maxsize)

        def put(event: Event) -> None:
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("event queue full, dropping %s", event.kind)

        return q, self.subscribe(put)
