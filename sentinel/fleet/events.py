"""What the fleet layer tells the daemon: events, and series for the store.

Alerts themselves come from rules (rules/fleet.yml) over the series below, so they go
through the same path as every other alert: `for:`, silences, the notifiers, the
outbox, Alertmanager. Fleet-wide series are exported by the leader only, which is what
makes SentinelPeerDown or FleetBreakerOpen fire on exactly one host of the fleet.

Events are for immediacy and the journal: each names the series it changed
(`metrics`), so the daemon can republish it on its event bus and the rule groups that
read those series evaluate at once instead of at their next tick.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["FLEET_METRICS", "FleetEvent", "FleetEventKind", "FleetSample"]

FleetEventKind = Literal[
    "peer_down",
    "peer_up",
    "breaker_open",
    "breaker_closed",
    "group_done",
    "group_failed",
    "leader_elected",
    "leader_deposed",
    "etcd_unreachable",
    "etcd_reachable",
    "slot_lost",
]


@dataclass(frozen=True)
class FleetEvent:
    kind: FleetEventKind
    message: str
    labels: Mapping[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.time)
    metrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class FleetSample:
    name: str
    labels: Mapping[str, str]
    value: float


# name -> (type, help). Local series come from every host; "leader:" ones only from the leader.
FLEET_METRICS: dict[str, tuple[str, str]] = {
    "sentinel_fleet_up": ("gauge", "1 while this host holds a valid lease on etcd (its fleet session)."),
    "sentinel_fleet_leader": ("gauge", "1 on the host that leads the fleet."),
    "sentinel_fleet_etcd_requests_total": ("counter", "Requests this host sent to etcd."),
    "sentinel_fleet_etcd_request_failures_total": ("counter", "Requests to etcd that failed (then tried elsewhere)."),
    "sentinel_fleet_slot_requests_total": ("counter", "Disruption slot requests by outcome (granted, local, refused)."),
    "sentinel_fleet_peers": ("gauge", "leader: fleet members by state (alive, down, left)."),
    "sentinel_fleet_peer_up": ("gauge", "leader: 1 while a member's lease is alive, 0 once it lapsed."),
    "sentinel_fleet_slots_held": ("gauge", "leader: disruption slots held per budget pool."),
    "sentinel_fleet_slots_limit": ("gauge", "leader: disruption slots allowed per budget pool now."),
    "sentinel_fleet_slot_waiters": ("gauge", "leader: requests waiting for a slot per budget pool."),
    "sentinel_fleet_breaker_open": ("gauge", "leader: 1 while the fleet breaker is open for an alert."),
    "sentinel_fleet_group_phase": (
        "gauge",
        "leader: 1 for the phase (running, done, failed) of a group's last action.",
    ),
}
