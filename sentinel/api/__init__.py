"""Sentinel's HTTP surface, on one aiohttp server.

- `server`: the app, `/metrics`, `/-/healthy`, `/-/ready` and the read-only JSON views;
- `exporter`: the store's `sentinel_*` series in Prometheus text or OpenMetrics;
- `prometheus`: Prometheus's query API over the local store and rules;
- `control`: worker state, the action journal, and pause/resume behind the control token.
"""

__all__ = ["control", "exporter", "prometheus", "server"]
