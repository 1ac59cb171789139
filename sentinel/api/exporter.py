"""Prometheus exposition of the store's own series.

The store is the single source of truth, so the exporter is a prometheus-client
collector that reads the newest live sample of every `sentinel_*` series at scrape
time; prometheus-client then renders text or OpenMetrics as the scraper asks.
Engine series scraped from workers (`vllm:*`) are not re-exported: Prometheus
scrapes those from the engines themselves.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from sentinel.store import Store

__all__ = ["StoreCollector", "render_metrics"]

EXPORTED_PREFIXES = ("sentinel_",)


class StoreCollector(Collector):
    """Yields one metric family per exported metric name in the store."""

    def __init__(self, store: Store, prefixes: tuple[str, ...] = EXPORTED_PREFIXES) -> None:
        self._store = store
        self._prefixes = prefixes

    def collect(self) -> Iterator[Metric]:
        for name in self._store.names():
            if not name.startswith(self._prefixes):
                continue
            samples = self._store.latest(name)
            if not samples:
                continue
            meta = self._store.meta(name)
            type_ = meta.type if meta else "untyped"
            help_ = meta.help if meta else ""
            family_name = name
            if type_ == "counter":
                # prometheus-client names the family without `_total` and the sample with it.
                family_name = name.removesuffix("_total")
            elif type_ == "info":
                type_ = "gauge"  # a value-1 gauge named *_info, which every parser accepts
            family = Metric(family_name, help_, type_)
            for sample in sorted(samples, key=lambda s: s.labels):
                labels = {k: v for k, v in sample.labels if k != "__name__"}
                family.add_sample(name, labels, sample.value)
            yield family


def render_metrics(store: Store, accept: str | None) -> tuple[bytes, str]:
    """Render the store for a scrape; returns (body, content type) by content negotiation."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
