"""Group actions for the remediation engine, run through the fleet coordinator.

The engine hands a disruptive action on a member of a serving group to `run`
(`sentinel.remediation.groups.GroupActions`). Before it takes the group lock this
host reads the status every member host publishes (one read per member host, each
bounded by `fleet.request_timeout`) and does not start a group action that cannot
end well:

- a member host without a live status (its Sentinel is down or cut off from etcd):
  nobody would carry out its steps — refused, tried again while the alert fires;
- a member that needs a human, or is paused: no host restarts the group until a
  person resumes it — blocked, not retried.

Otherwise `FleetCoordinator.run_group_action` runs the plan (lock, one budget slot,
stop all → same profile → head first → the others in order → verify) and its outcome
is the engine's: done, failed (escalate), refused (retry), busy (handled elsewhere).
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError

from sentinel.fleet import FleetConfig, FleetCoordinator, HostStatus
from sentinel.fleet.config import GroupConfig
from sentinel.fleet.etcd import EtcdError
from sentinel.remediation.groups import GroupOutcome, GroupRequest

__all__ = ["FleetGroupActions"]

log = logging.getLogger(__name__)


class FleetGroupActions:
    """`GroupActions` over the fleet coordinator (module doc)."""

    def __init__(self, coordinator: FleetCoordinator, config: FleetConfig) -> None:
        self._coordinator = coordinator
        self._config = config

    def group_of(self, worker: str) -> str | None:
        group = self._config.group_of(self._config.host_id, worker)
        return group.name if group is not None else None

    async def run(self, request: GroupRequest) -> GroupOutcome:
        group = self._config.group_of(self._config.host_id, request.worker)
        if group is None:
            return GroupOutcome("refused", "-", f"worker {request.worker} is in no serving group")
        coordinator = self._coordinator
        if not coordinator.up:
            return GroupOutcome(
                "refused", group.name, "no valid fleet session: a group action needs every member through etcd"
            )
        obstacle = await self._members_obstacle(group)
        if obstacle is not None:
            return obstacle
        log.warning(
            "group %s: %s of every member (profile %s) after %s on %s",
            group.name,
            request.action,
            request.profile,
            request.reason,
            request.worker,
        )
        result = await coordinator.run_group_action(
            group.name, request.action, profile=request.profile, reason=request.reason, alert=request.alert or None
        )
        plan = f" (plan {result.plan_id})" if result.plan_id else ""
        return GroupOutcome(result.outcome, group.name, f"{result.reason}{plan}")

    async def _members_obstacle(self, group: GroupConfig) -> GroupOutcome | None:
        """Why the group action should not start now, from every member host's status."""
        hosts = sorted({m.host for m in group.members})
        keys = self._coordinator.keys
        client = self._coordinator.client
        try:
            values = await asyncio.gather(*(client.get(keys.host(h)) for h in hosts))
        except EtcdError as exc:
            return GroupOutcome("refused", group.name, f"cannot read the members' status: {exc}")
        statuses: dict[str, HostStatus | None] = {}
        for host, kv in zip(hosts, values, strict=True):
            try:
                statuses[host] = HostStatus.model_validate_json(kv.value) if kv is not None else None
            except (ValidationError, ValueError):
                statuses[host] = None
        for m in group.members:
            status = statuses[m.host]
            if status is None:
                return GroupOutcome(
                    "refused",
                    group.name,
                    f"member {m.member}: host {m.host} publishes no status (its Sentinel is down or cut off "
                    "from etcd), so nobody would carry out its steps",
                )
            worker = next((w for w in status.workers if w.name == m.worker), None)
            if worker is None:
                continue  # its step says so, with the host's own words
            if worker.needs_human:
                return GroupOutcome(
                    "blocked", group.name, f"member {m.member} needs a human: no group action until it is resumed"
                )
            if worker.state == "paused":
                return GroupOutcome(
                    "blocked", group.name, f"member {m.member} is paused: no group action until it is resumed"
                )
        return None
