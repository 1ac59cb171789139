"""The fleet's gate in the remediation engine: a disruption slot before a disruptive action.

Asked after the host-wide slot (`sentinel.remediation.gate`), for every action the
engine is about to carry out on a worker that acts alone (members of a serving group
take one slot for the whole group, through their group action instead):

- a disruptive action (restart, reduce_batch that restarts, quantized_fallback,
  restore, stop, a disruptive exec) takes a slot of the fleet's disruption budget
  (`FleetCoordinator.acquire_slot`, which waits at most `fleet.budget.wait`) and holds it
  until the action is verified; no slot is a `Refusal` with the budget's reason, tried
  again while the alert fires;
- an alert the fleet breaker holds open is acted on by no host, disruptive or not;
- etcd away: `partition_policy: hold` refuses with the reason ("etcd unreachable since
  12:03:10 ...; partition_policy is hold"); `local` lets the action through under this
  host's own limits, and the report says so;
- a slot lost while the action ran (this host's lease lapsed) is said in the action's
  report; the action itself cannot be undone.

`precheck` answers from memory (the breaker mirror, the session's validity), so a
standing obstacle does not cost a journal row and a report on every retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from sentinel.fleet import FleetCoordinator, SlotDecision
from sentinel.remediation.gate import Admission, Grant, Refusal

__all__ = ["FleetGate"]

log = logging.getLogger(__name__)


class _Nothing:
    async def release(self) -> None:
        return None


class _SlotGrant:
    """A held fleet slot; released (and its loss, if any, noted) when the action has ended."""

    def __init__(self, coordinator: FleetCoordinator, decision: SlotDecision, request: Admission) -> None:
        self._coordinator = coordinator
        self._decision = decision
        self._request = request

    async def release(self) -> None:
        decision = self._decision
        if decision.lost.is_set():
            note = (
                f"the fleet slot ({decision.holder}) was lost while the action ran: this host's etcd lease "
                "lapsed, so other hosts may have acted meanwhile"
            )
            self._request.notes.append(note)
            log.error("worker %s: %s", self._request.worker, note)
        await self._coordinator.release_slot(decision)


class FleetGate:
    """See the module doc."""

    name = "fleet"

    def __init__(self, coordinator: FleetCoordinator, labels: Mapping[str, Mapping[str, str]]) -> None:
        self._coordinator = coordinator
        self._labels = labels  # worker -> its labels (per-label budget pools)

    def _breaker_refusal(self, request: Admission) -> Refusal | None:
        record = self._coordinator.breaker(request.alert or None)
        if record is None:
            return None
        reason = (
            f"fleet breaker open for {request.alert}: it started on {len(record.hosts)} hosts within the window "
            f"({', '.join(record.hosts[:5])}{'...' if len(record.hosts) > 5 else ''}), so it is systemic and "
            f"no host acts on it; `sentinel fleet resume {request.alert}` once the cause is fixed"
        )
        return Refusal(self.name, reason)

    def precheck(self, request: Admission) -> Refusal | None:
        refusal = self._breaker_refusal(request)
        if refusal is not None or not request.disruptive:
            return refusal
        coordinator = self._coordinator
        since = coordinator.session.unreachable_since if coordinator.started else None
        # Known away: the lease lapsed, or etcd failed the last call and none succeeded since.
        if coordinator.config.partition_policy == "hold" and (not coordinator.up or since is not None):
            when = f" since {_clock(since)}" if since else ""
            return Refusal(
                self.name,
                f"etcd unreachable{when}; partition_policy is hold: no disruptive action without a fleet slot",
            )
        return None

    async def admit(self, request: Admission) -> Grant | Refusal:
        refusal = self._breaker_refusal(request)
        if refusal is not None:
            return refusal
        if not request.disruptive:
            return _Nothing()
        decision = await self._coordinator.acquire_slot(
            request.worker,
            request.action,
            labels=self._labels.get(request.worker, {}),
            alert=request.alert or None,
        )
        if not decision:
            log.warning("worker %s: no fleet slot for %s: %s", request.worker, request.action, decision.reason)
            return Refusal(self.name, decision.reason)
        if decision.mode == "local":
            request.notes.append(decision.reason)
            log.warning("worker %s: %s without a fleet slot: %s", request.worker, request.action, decision.reason)
            return _Nothing()
        log.info("worker %s: %s holds fleet slot %s", request.worker, request.action, decision.reason)
        return _SlotGrant(self._coordinator, decision, request)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))
