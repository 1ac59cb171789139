"""Admission: who may act on a worker now. The gates an action passes before it touches anything.

An action that has been decided (and journaled) still needs admission before its
backend verb runs. Today there is one gate, the host-wide slot: at most
`remediation.max_concurrent` disruptive actions at once on this host, the others wait
for a slot. A fleet layer (a disruption budget held in etcd, one slot per disruptive
action across hosts) plugs in as another `ActionGate`: `admit()` may wait (bounded, its
own business), and returns a `Grant`, released when the action has finished, or a
`Refusal` with a reason. The engine passes the gates in order (`Gates.admit`), and a
refused action is journaled as skipped with the gate's reason and tried again while its
alert still fires, if the refusal says it may pass. A gate that can tell cheaply that it
would still refuse (`PrecheckGate`: the fleet breaker still open, etcd still away) is
asked before such a retry, so a standing obstacle costs no journal row and no report per
tick. A gate may leave notes on the request (`Admission.notes`: "acted under local
limits only", "the fleet slot was lost mid-action"); the engine adds them to the action's
report.

    async with gates.admit(Admission(worker, plan.action, plan.disruptive)) as refusal:
        if refusal is None:
            ... perform and verify ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["ActionGate", "Admission", "Gates", "Grant", "HostSlots", "PrecheckGate", "Refusal"]


@dataclass(frozen=True)
class Admission:
    """What asks to be let through: an action on a worker, and the alert behind it ("" for none)."""

    worker: str
    action: str
    disruptive: bool
    alert: str = field(default="", compare=False)
    notes: list[str] = field(default_factory=list, compare=False)  # what gates want said in the report


@dataclass(frozen=True)
class Refusal:
    """A gate said no; `transient`: the obstacle may pass (try again while the alert fires)."""

    gate: str
    reason: str
    transient: bool = True


class Grant(Protocol):
    """Permission to act, held until the action has finished."""

    async def release(self) -> None: ...


class ActionGate(Protocol):
    """One gate (module doc)."""

    name: str

    async def admit(self, request: Admission) -> Grant | Refusal: ...


@runtime_checkable
class PrecheckGate(Protocol):
    """A gate that can say, without waiting or asking anyone, that it would refuse now."""

    name: str

    def precheck(self, request: Admission) -> Refusal | None: ...


class _NoGrant:
    async def release(self) -> None:
        return None


class _SlotGrant:
    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore

    async def release(self) -> None:
        self._semaphore.release()


class HostSlots:
    """At most `size` disruptive actions at once on this host; the others wait for a slot."""

    name = "host"

    def __init__(self, size: int) -> None:
        self._semaphore = asyncio.Semaphore(size)
        self.size = size

    def resize(self, size: int) -> None:
        """New actions use `size` slots; those holding a slot of the old size finish with it."""
        if size != self.size:
            self._semaphore = asyncio.Semaphore(size)
            self.size = size

    @property
    def full(self) -> bool:
        return self._semaphore.locked()

    async def admit(self, request: Admission) -> Grant | Refusal:
        if not request.disruptive:
            return _NoGrant()
        semaphore = self._semaphore
        await semaphore.acquire()
        return _SlotGrant(semaphore)


class Gates:
    """The gates in the order they are asked; the host slot first."""

    def __init__(self, gates: Sequence[ActionGate]) -> None:
        self.gates = list(gates)

    def precheck(self, request: Admission) -> Refusal | None:
        """The first refusal a gate can foresee without waiting (None: worth trying)."""
        for gate in self.gates:
            if isinstance(gate, PrecheckGate):
                refusal = gate.precheck(request)
                if refusal is not None:
                    return refusal
        return None

    @contextlib.asynccontextmanager
    async def admit(self, request: Admission) -> AsyncIterator[Refusal | None]:
        """Pass every gate (yield None) or stop at the first refusal (yield it); grants end with the block."""
        grants: list[Grant] = []
        refusal: Refusal | None = None
        try:
            for gate in self.gates:
                answer = await gate.admit(request)
                if isinstance(answer, Refusal):
                    refusal = answer
                    break
                grants.append(answer)
            yield refusal
        finally:
            for grant in reversed(grants):
                await asyncio.shield(grant.release())
