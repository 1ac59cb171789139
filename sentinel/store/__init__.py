"""The store: where collectors' samples and events land, and what rules and the API read.

- `Store` (`series`): the in-memory time-series store with Prometheus's staleness and
  lookback semantics; `Appender` commits one collector pass; `LabelMatcher`/`MatchOp`
  select series; `Labels`, `Sample`, `Series` are its values.
- `EventBus` (`events`): things that happened at an instant (an Xid, an OOM line),
  delivered to subscribers on the event loop at once.
"""

from sentinel.store.events import Event, EventBus, Subscriber
from sentinel.store.series import (
    DEFAULT_LOOKBACK_MS,
    DEFAULT_RETENTION_MS,
    RANGE_NONNEGATIVE,
    STALE_NAN,
    Appender,
    LabelMatcher,
    Labels,
    MatchOp,
    MetricMeta,
    Sample,
    Series,
    Store,
    is_stale_marker,
    labels_from,
    now_ms,
)

__all__ = [
    "DEFAULT_LOOKBACK_MS",
    "DEFAULT_RETENTION_MS",
    "RANGE_NONNEGATIVE",
    "STALE_NAN",
    "Appender",
    "Event",
    "EventBus",
    "LabelMatcher",
    "Labels",
    "MatchOp",
    "MetricMeta",
    "Sample",
    "Series",
    "Store",
    "Subscriber",
    "is_stale_marker",
    "labels_from",
    "now_ms",
]
