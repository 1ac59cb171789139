"""Remediation durations run on the steady clock: wall-clock steps neither fire nor block actions (issue 15, F8).

`Wall.step_wall` moves the engine's wall clock alone, as the system clock moved under
the 0.1 engine; Sentinel's own wall clock never steps back (sentinel.runtime.clock), and
the daemon-level test (test_daemon_clock.py) steps the real system clock.
"""

from __future__ import annotations

from pathlib import Path

from sentinel.remediation.gate import Admission, Refusal
from tests.remediation_fakes import (
    Harness,
    Wall,
    close_harnesses,  # noqa: F401  (autouse: closes what a failed test left open)
    firing,
    policy,
    worker,
)


async def test_a_forward_step_of_the_wall_clock_does_not_step_a_degraded_worker_up(tmp_path: Path) -> None:
    h = Harness(tmp_path, policy(stable_for=1800), [worker()])
    await h.remediator.start()
    try:
        h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
        await h.remediator.wait_idle()
        h.wall.step_wall(3600)  # NTP steps the clock forward an hour
        await h.remediator.tick()
        await h.remediator.wait_idle()
        assert h.backend("qwen").calls == [("restart", "reduced")]  # no immediate restore
        h.wall.advance(1801)  # stable_for really passes
        await h.remediator.tick()
        await h.remediator.wait_idle()
        assert h.backend("qwen").calls[-1] == ("restart", "full")
    finally:
        await h.remediator.close()


async def test_a_cooldown_read_back_after_a_restart_in_the_same_boot_ignores_a_wall_step(tmp_path: Path) -> None:
    wall = Wall()
    h = Harness(tmp_path, policy(cooldown=300), [worker()], wall=wall)
    await h.remediator.start()
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=1))
    await h.remediator.wait_idle()
    await h.remediator.close()

    wall.step_wall(3600)  # while Sentinel was down, the wall clock jumped an hour
    h2 = Harness(tmp_path, policy(cooldown=300), [worker()], wall=wall)
    await h2.remediator.start()
    try:
        h2.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=2))
        await h2.remediator.wait_idle()
        assert h2.backend("qwen").calls == []  # the steady clock says seconds passed, not an hour
        assert "cooling down" in h2.reports[-1].detail
    finally:
        await h2.remediator.close()

    wall.boot = "another-boot"  # after a reboot only the wall clock can tell: the hour counts
    h3 = Harness(tmp_path, policy(cooldown=300), [worker()], wall=wall)
    await h3.remediator.start()
    try:
        h3.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=3))
        await h3.remediator.wait_idle()
        assert h3.backend("qwen").calls == [("restart", "full")]
    finally:
        await h3.remediator.close()


class FleetBudget:
    """A fleet-wide disruption budget as the etcd layer will be: it may refuse an action."""

    name = "fleet"

    def __init__(self) -> None:
        self.asked: list[Admission] = []
        self.open = False

    async def admit(self, request: Admission) -> Refusal | _Grant:
        self.asked.append(request)
        if not self.open:
            return Refusal(self.name, "3 of 3 fleet slots held (hosts a, b, c)")
        return _Grant()


class _Grant:
    async def release(self) -> None:
        return None


async def test_a_refusing_fleet_gate_skips_the_action_without_using_its_budget_and_retries(tmp_path: Path) -> None:
    fleet = FleetBudget()
    h = Harness(tmp_path, policy(budget={"count": 1, "window": 3600}), [worker()], gates=[fleet])
    await h.remediator.start()
    try:
        h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=1))
        await h.remediator.wait_idle()
        assert h.backend("qwen").calls == []
        assert fleet.asked == [Admission("qwen", "restart", disruptive=True)]
        skipped = h.reports[-1]
        assert (skipped.action, skipped.outcome) == ("restart", "skipped") and "fleet slots held" in skipped.detail
        assert h.remediator.workers_json()["workers"][0]["state"] == "ok"

        fleet.open = True  # a slot frees; the alert still fires: the deferred request runs
        h.store.add(
            "ALERTS",
            1.0,
            {"alertname": "EngineStalled", "worker": "qwen", "alertstate": "firing"},
            timestamp_ms=h.wall.ms,
        )
        await h.remediator.tick()
        await h.remediator.wait_idle()
        assert h.backend("qwen").calls == [("restart", "full")]  # the budget of 1 was not used by the refusal
        rows = await h.remediator.actions_json(10)
        assert [r["outcome"] for r in rows if r["action"] == "restart"] == ["succeeded", "skipped"]
    finally:
        await h.remediator.close()
