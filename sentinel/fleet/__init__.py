"""Coordinated healing across hosts, on etcd.

Each Sentinel still heals its own host; with a `fleet:` section it also joins a fleet:
it publishes its status under a lease, takes a slot of a fleet-wide disruption budget
before any disruptive action, stops acting on an alert the fleet breaker calls
systemic, and runs its part of serving-group restarts that span hosts. One Sentinel,
elected, watches the others and raises SentinelPeerDown when one disappears.

Modules, bottom-up: etcd (the v3 JSON gateway client), watch (list+watch mirror),
session (the lease), election, keys/status (what lives where), budget, breaker,
groups, leader, coordinator (the façade), cli (`sentinel fleet status`).
See docs/fleet.md.
"""

from sentinel.fleet.budget import SlotDecision
from sentinel.fleet.config import FleetConfig, check_against_workers
from sentinel.fleet.coordinator import DISRUPTIVE_ACTIONS, FleetCoordinator, FleetSetupError
from sentinel.fleet.events import FLEET_METRICS, FleetEvent, FleetSample
from sentinel.fleet.groups import GroupActionResult, LocalExecutor, StepOutcome
from sentinel.fleet.status import AlertStatus, HostStatus, WorkerStatus

__all__ = [
    "DISRUPTIVE_ACTIONS",
    "FLEET_METRICS",
    "AlertStatus",
    "FleetConfig",
    "FleetCoordinator",
    "FleetEvent",
    "FleetSample",
    "FleetSetupError",
    "GroupActionResult",
    "HostStatus",
    "LocalExecutor",
    "SlotDecision",
    "StepOutcome",
    "WorkerStatus",
    "check_against_workers",
]
