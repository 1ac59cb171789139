"""The remediation engine over fake backends, a real store and a real journal, with a controllable wall clock."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from sentinel.remediation.journal import ActionRow, Journal, WorkerRecord, episode_key
from sentinel.store import labels_from
from tests.remediation_fakes import (
    T0,
    FakeBackend,
    FakeLive,
    Harness,
    close_harnesses,  # noqa: F401  (autouse: closes what a failed test left open)
    firing,
    healthy,
    policy,
    resolved,
    worker,
)
from tests.support import eventually_async as eventually


async def started(h: Harness) -> Harness:
    await h.remediator.start()
    return h


async def settle(h: Harness) -> None:
    await h.remediator.wait_idle()


# -- acting ---------------------------------------------------------------------------------


async def test_firing_alert_with_action_label_restarts_worker_and_verifies_health(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(), [worker()]))
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart"))
    await settle(h)
    assert h.backend("qwen").calls == [("restart", "full")]
    ctx = h.backend("qwen").contexts[0]
    assert (ctx.alertname, ctx.action, ctx.profile) == ("EngineStalled", "restart", "full")
    assert h.outcomes() == [("restart", "started"), ("restart", "succeeded")]
    assert h.reports[-1].seconds_to_healthy is not None and h.reports[-1].alertname == "EngineStalled"
    rows = await h.remediator.actions_json(10)
    assert rows[0]["outcome"] == "succeeded" and rows[0]["episode"] == episode_key(
        firing("EngineStalled", worker="qwen", action="restart").alert.fingerprint, 1000
    )
    assert h.metric("sentinel_remediation_actions_total", worker="qwen", action="restart", outcome="succeeded") == 1
    await h.remediator.close()


async def test_only_firing_transitions_act(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(), [worker()]))
    event = firing("EngineStalled", worker="qwen", action="restart")
    h.remediator.on_alert(resolved(event))
    h.remediator.on_alert(firing("NoWorker", action="restart"))
    h.remediator.on_alert(firing("Unknown", worker="ghost", action="restart"))
    await settle(h)
    assert h.backend("qwen").calls == [] and h.reports == []
    await h.remediator.close()


async def test_gpu_alert_without_worker_label_goes_to_the_worker_owning_the_gpu(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(), [worker("a", gpus=[0, 1]), worker("b", gpus=[2, 3])]))
    h.remediator.on_alert(firing("GpuXid", gpu="3", action="restart"))
    await settle(h)
    assert h.backend("b").calls == [("restart", "full")] and h.backend("a").calls == []
    await h.remediator.close()


async def test_reduce_batch_moves_one_rung_down_and_exports_the_profile(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(), [worker()]))
    assert h.metric("sentinel_worker_profile", worker="qwen", profile="full") == 1
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
    await settle(h)
    assert h.backend("qwen").calls == [("restart", "reduced")]
    assert h.backend("qwen").contexts[0].previous_profile == "full"
    assert h.metric("sentinel_worker_profile", worker="qwen", profile="reduced") == 1
    assert h.metric("sentinel_worker_profile", worker="qwen", profile="full") == 0
    (row,) = await h.remediator.actions_json(1)
    assert (row["profile_before"], row["profile_after"]) == ("full", "reduced")
    assert h.remediator.workers_json()["workers"][0]["state"] == "degraded"
    await h.remediator.close()


async def test_quantized_fallback_goes_to_the_first_quantized_profile(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(), [worker()]))
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="quantized_fallback"))
    await settle(h)
    assert h.backend("qwen").calls == [("restart", "fp8")]
    await h.remediator.close()


async def test_reduce_batch_with_the_probe_goes_live_without_a_restart(tmp_path: Path) -> None:
    live = FakeLive()
    h = Harness(tmp_path, policy(), [worker(probe=True)], live=live)
    await h.remediator.start()
    healthy(h.store, h.wall, "qwen")
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
    await settle(h)
    assert live.limits == [("qwen", 16)] and h.backend("qwen").calls == []
    assert h.outcomes()[-1] == ("reduce_batch", "succeeded")
    assert h.metric("sentinel_worker_profile", worker="qwen", profile="reduced") == 1
    await h.remediator.close()


async def test_route_sends_an_alert_to_exec_with_its_context_in_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    script = f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w'))"
    argv = f"{sys.executable} -c {json.dumps(script)}"
    cfg = policy(routes=[{"match": {"alertname": "Dump"}, "action": "exec", "params": {"argv": argv}}])
    h = await started(Harness(tmp_path, cfg, [worker()]))
    # A label value with shell syntax stays a plain string in the environment.
    h.remediator.on_alert(firing("Dump", worker="qwen", reason="$(touch /tmp/pwned); `id`"))
    await settle(h)
    env = json.loads(out.read_text())
    assert env["SENTINEL_ALERTNAME"] == "Dump" and env["SENTINEL_WORKER"] == "qwen"
    assert env["SENTINEL_LABEL_REASON"] == "$(touch /tmp/pwned); `id`"
    assert h.outcomes() == [("exec", "started"), ("exec", "succeeded")]
    await h.remediator.close()


async def test_failing_exec_is_a_failed_action(tmp_path: Path) -> None:
    argv = f"{sys.executable} -c 'import sys; print(\"no disk\"); sys.exit(3)'"
    cfg = policy(routes=[{"match": {"alertname": "Dump"}, "action": "exec", "params": {"argv": argv}}], ladder=[])
    h = await started(Harness(tmp_path, cfg, [worker()]))
    h.remediator.on_alert(firing("Dump", worker="qwen"))
    await settle(h)
    failed = next(r for r in await h.remediator.actions_json(5) if r["action"] == "exec")
    assert failed["outcome"] == "failed" and "status 3" in failed["error"] and "no disk" in failed["error"]
    await h.remediator.close()


async def test_notify_only_reports_and_never_touches_the_worker(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(), [worker()]))
    await h.remediator.pause("qwen")
    h.remediator.on_alert(firing("Imbalance", worker="qwen", action="notify_only"))
    await settle(h)
    assert h.backend("qwen").calls == [] and h.outcomes() == [("notify_only", "succeeded")]
    await h.remediator.close()


async def test_stop_takes_the_worker_out_until_a_human_resumes_it(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(), [worker()]))
    h.remediator.on_alert(firing("GpuFellOffBus", worker="qwen", action="stop"))
    await settle(h)
    assert h.backend("qwen").calls == [("stop", "")]
    assert h.remediator.workers_json()["workers"][0]["needs_human"]
    h.remediator.on_alert(firing("EngineDown", worker="qwen", action="restart"))
    await settle(h)
    assert h.backend("qwen").calls == [("stop", "")]
    await h.remediator.close()


# -- observe mode -----------------------------------------------------------------------------


async def test_observe_mode_journals_and_notifies_would_act_and_never_touches_the_worker(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(mode="observe"), [worker()]))
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
    await settle(h)
    assert h.backend("qwen").calls == []
    assert h.outcomes() == [("reduce_batch", "would_act")]
    assert (h.reports[0].from_profile, h.reports[0].to_profile) == ("full", "reduced")
    (row,) = await h.remediator.actions_json(5)
    assert (row["mode"], row["outcome"]) == ("observe", "would_act")
    assert h.metric("sentinel_worker_profile", worker="qwen", profile="full") == 1
    assert h.metric("sentinel_remediation_actions_total", worker="qwen", action="reduce_batch", outcome="would_act")
    await h.remediator.close()


async def test_observe_mode_applies_cooldowns_to_what_it_would_do(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(mode="observe", cooldown=300), [worker()]))
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="restart", active_at_ms=1))
    h.wall.advance(10)
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="restart", active_at_ms=2))
    await settle(h)
    assert h.outcomes() == [("restart", "would_act"), ("restart", "skipped")]
    assert h.backend("qwen").calls == []
    await h.remediator.close()


# -- limits -----------------------------------------------------------------------------------


async def test_cooldown_skips_a_new_episode_until_it_has_passed(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(cooldown=300), [worker()]))
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=1))
    await settle(h)
    h.wall.advance(100)
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=2))
    await settle(h)
    assert len(h.backend("qwen").calls) == 1
    skipped = h.reports[-1]
    assert skipped.outcome == "skipped" and "cooling down for 200s" in skipped.detail
    h.wall.advance(201)
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=3))
    await settle(h)
    assert len(h.backend("qwen").calls) == 2
    await h.remediator.close()


async def test_spent_budget_escalates_then_ladder_exhausted_needs_human_until_resume(tmp_path: Path) -> None:
    cfg = policy(
        budget={"count": 1, "window": 3600},
        ladder=[{"action": "reduce_batch", "times": 1}, {"action": "restart", "times": 1}],
    )
    h = await started(Harness(tmp_path, cfg, [worker()]))
    for i in range(1, 4):
        h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=i))
        await settle(h)
        h.wall.advance(1)
    # restart (budget 1) -> escalates to reduce_batch -> restart's budget is spent: needs a human.
    assert h.backend("qwen").calls == [("restart", "full"), ("restart", "reduced")]
    last = h.reports[-1]
    assert (last.outcome, last.severity) == ("needs_human", "critical") and "ladder exhausted" in last.detail
    assert h.metric("sentinel_worker_needs_human", worker="qwen") == 1
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=9))
    await settle(h)
    assert len(h.backend("qwen").calls) == 2 and "waiting for a human" in h.reports[-1].detail

    await h.remediator.resume("qwen")
    assert h.metric("sentinel_worker_needs_human", worker="qwen") == 0
    h.wall.advance(3600)  # budgets are per window: the next hour acts again
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=10))
    await settle(h)
    assert len(h.backend("qwen").calls) == 3
    await h.remediator.close()


async def test_failed_verification_counts_as_failure_and_escalates_along_the_ladder(tmp_path: Path) -> None:
    cfg = policy(ladder=[{"action": "reduce_batch", "times": 1}, {"action": "quantized_fallback", "times": 1}])
    h = Harness(tmp_path, cfg, [worker()])
    h.backend("qwen").heals = False
    await h.remediator.start()
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart"))
    await settle(h)
    assert h.backend("qwen").calls == [("restart", "full"), ("restart", "reduced"), ("restart", "fp8")]
    outcomes = [o for o in h.outcomes() if o[1] != "started"]
    assert outcomes == [
        ("restart", "failed"),
        ("reduce_batch", "failed"),
        ("quantized_fallback", "failed"),
        ("escalate", "needs_human"),
    ]
    assert "no health probe since the action" in h.reports[1].detail
    await h.remediator.close()


async def test_verification_needs_fresh_samples_and_progress_when_requests_run(tmp_path: Path) -> None:
    h = Harness(tmp_path, policy(verify_timeout=3, ladder=[]), [worker()])
    backend = h.backend("qwen")
    backend.heals = False
    await h.remediator.start()
    # Up before the restart: must not count.
    healthy(h.store, h.wall, "qwen")
    h.wall.advance(1)
    backend.gate = asyncio.Event()
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart"))
    await backend.entered.wait()
    backend.gate.set()
    await asyncio.sleep(0.05)
    assert h.remediator.workers_json()["workers"][0]["state"] == "verifying"
    h.store.add("sentinel_endpoint_progress_total", 5, {"worker": "qwen"}, timestamp_ms=h.wall.ms)
    h.store.add("sentinel_endpoint_requests_running", 3, {"worker": "qwen"}, timestamp_ms=h.wall.ms)
    healthy(h.store, h.wall, "qwen")
    await asyncio.sleep(0.05)
    assert h.remediator.workers_json()["workers"][0]["in_flight"]["phase"] == "verifying"
    h.wall.advance(1)
    h.store.add("sentinel_endpoint_progress_total", 6, {"worker": "qwen"}, timestamp_ms=h.wall.ms)
    await settle(h)
    assert h.outcomes()[-1] == ("restart", "succeeded")
    await h.remediator.close()


async def test_backend_error_fails_the_action_and_escalates(tmp_path: Path) -> None:
    h = Harness(tmp_path, policy(ladder=[{"action": "reduce_batch", "times": 1}]), [worker()])
    h.backend("qwen").fail = True
    await h.remediator.start()
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart"))
    await settle(h)
    failed = [r for r in h.reports if r.outcome == "failed"]
    assert [r.action for r in failed] == ["restart", "reduce_batch"]
    assert "job for qwen failed" in failed[0].detail
    assert h.remediator.workers_json()["workers"][0]["needs_human"]
    await h.remediator.close()


async def test_one_action_in_flight_per_worker(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(), [worker()]))
    backend = h.backend("qwen")
    backend.gate = asyncio.Event()
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart"))
    await backend.entered.wait()
    assert h.metric("sentinel_remediation_in_flight") == 1
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
    assert h.reports[-1].outcome == "skipped" and "restart already in flight" in h.reports[-1].detail
    backend.gate.set()
    await settle(h)
    assert backend.calls == [("restart", "full")]
    assert h.metric("sentinel_remediation_in_flight") == 0
    await h.remediator.close()


async def test_host_wide_cap_holds_disruptive_actions_until_a_slot_frees(tmp_path: Path) -> None:
    shared = [0, 0]
    h = Harness(
        tmp_path,
        policy(max_concurrent=1, circuit_breaker={"max_ratio": 1.0}),
        [worker("a", gpus=[0]), worker("b", gpus=[1])],
    )
    for name in ("a", "b"):
        h.backends[name].concurrency = shared  # type: ignore[attr-defined]
        h.backend(name).gate = asyncio.Event()
    await h.remediator.start()
    h.remediator.on_alert(firing("EngineStalled", worker="a", action="restart"))
    h.remediator.on_alert(firing("EngineStalled", worker="b", action="restart"))
    await h.backend("a").entered.wait()
    await asyncio.sleep(0.1)
    assert h.backend("b").calls == []  # decided (in flight) but waiting for the host's slot
    assert h.remediator.workers_json()["in_flight"] == 2
    h.backend("a").gate.set()  # type: ignore[union-attr]
    await h.backend("b").entered.wait()
    h.backend("b").gate.set()  # type: ignore[union-attr]
    await settle(h)
    assert shared[1] == 1 and h.outcomes().count(("restart", "succeeded")) == 2
    await h.remediator.close()


async def test_circuit_breaker_stops_acting_when_too_many_workers_were_remediated(tmp_path: Path) -> None:
    workers = [worker(n, gpus=[i]) for i, n in enumerate("abcd")]
    h = await started(Harness(tmp_path, policy(circuit_breaker={"max_ratio": 0.5, "window": 600}), workers))
    for name in "abc":
        h.remediator.on_alert(firing("EngineStalled", worker=name, action="restart"))
        await settle(h)
    assert [len(h.backend(n).calls) for n in "abcd"] == [1, 1, 0, 0]
    refused = h.reports[-1]
    assert (refused.outcome, refused.severity) == ("skipped", "critical") and "circuit breaker" in refused.detail
    assert h.metric("sentinel_remediation_circuit_breaker_open") == 1  # a third worker would be refused
    h.wall.advance(601)
    await h.remediator.tick()
    assert h.metric("sentinel_remediation_circuit_breaker_open") == 0
    h.remediator.on_alert(firing("EngineStalled", worker="c", action="restart", active_at_ms=5))
    await settle(h)
    assert len(h.backend("c").calls) == 1
    await h.remediator.close()


async def test_pause_all_skips_every_worker_and_survives_a_restart(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(), [worker()]))
    await h.remediator.pause(None)
    await h.remediator.close()
    h2 = await started(Harness(tmp_path, policy(), [worker()], wall=h.wall))
    assert h2.metric("sentinel_remediation_paused", worker="qwen") == 1
    h2.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart"))
    await settle(h2)
    assert h2.backend("qwen").calls == [] and "paused on all workers" in h2.reports[-1].detail
    await h2.remediator.resume(None)
    h2.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=7))
    await settle(h2)
    assert h2.backend("qwen").calls == [("restart", "full")]
    await h2.remediator.close()


# -- recovery ---------------------------------------------------------------------------------


async def test_recovery_steps_back_up_one_rung_after_stable_for_without_the_cause(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(stable_for=1800), [worker()]))
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
    await settle(h)
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch", active_at_ms=2))
    await settle(h)
    assert h.metric("sentinel_worker_profile", worker="qwen", profile="fp8") == 1

    h.wall.advance(1000)
    # The cause is still firing (as the store's ALERTS say): the stable clock starts over.
    alert = labels_from("ALERTS", {"alertname": "CudaOOM", "worker": "qwen", "alertstate": "firing"})
    h.store.append(alert, h.wall.ms, 1.0)
    await h.remediator.tick()
    h.wall.advance(1000)
    await h.remediator.tick()
    assert len(h.backend("qwen").calls) == 2
    h.wall.advance(801)
    await h.remediator.tick()
    await settle(h)
    assert h.backend("qwen").calls[-1] == ("restart", "reduced")
    assert h.outcomes()[-1] == ("restore", "succeeded")
    # One rung at a time: the next waits another stable_for.
    h.wall.advance(1799)
    await h.remediator.tick()
    assert len(h.backend("qwen").calls) == 3
    h.wall.advance(2)
    await h.remediator.tick()
    await settle(h)
    assert h.backend("qwen").calls[-1] == ("restart", "full")
    assert h.remediator.workers_json()["workers"][0]["state"] == "ok"
    await h.remediator.close()


async def test_no_step_up_within_the_startup_grace(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(stable_for=60), [worker()]))
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
    await settle(h)
    await h.remediator.close()
    h2 = await started(Harness(tmp_path, policy(stable_for=60), [worker()], wall=h.wall, startup_grace=120))
    h.wall.advance(61)
    await h2.remediator.tick()
    assert h2.backend("qwen").calls == []  # restored alerts may not be in the store yet
    h.wall.advance(60)
    await h2.remediator.tick()
    await settle(h2)
    assert h2.backend("qwen").calls == [("restart", "full")]
    await h2.remediator.close()


# -- crash safety ------------------------------------------------------------------------------


async def test_crash_mid_action_is_journaled_as_interrupted_reverified_and_not_repeated(tmp_path: Path) -> None:
    event = firing("CudaOOM", worker="qwen", action="reduce_batch", active_at_ms=42)
    # What a Sentinel killed in the middle of reduce_batch leaves on disk: the write-ahead
    # row without a finish, and the worker's new profile.
    journal = Journal.in_dir(tmp_path)
    journal.insert(
        ActionRow(
            worker="qwen",
            action="reduce_batch",
            mode="act",
            trigger="alert",
            started=T0 - 5,
            alertname="CudaOOM",
            fingerprint=event.alert.fingerprint,
            episode=episode_key(event.alert.fingerprint, 42),
            profile_before="full",
            profile_after="reduced",
        )
    )
    journal.save_worker("qwen", WorkerRecord(profile="reduced", trouble_alerts=("CudaOOM",), last_trouble_at=T0 - 5))
    journal.close()

    h = Harness(tmp_path, policy(verify_timeout=3), [worker()])
    await h.remediator.start()
    assert h.remediator.workers_json()["workers"][0]["state"] == "verifying"
    healthy(h.store, h.wall, "qwen")
    await settle(h)
    (row,) = await h.remediator.actions_json(5)
    assert (row["outcome"], row["verify"]) == ("interrupted", "passed")
    assert h.metric("sentinel_remediation_actions_total", worker="qwen", action="reduce_batch", outcome="interrupted")
    assert h.outcomes() == [("reduce_batch", "succeeded")] and "interrupted" in h.reports[0].detail
    # The same alert episode arrives again (e.g. re-delivered): no second reduce_batch.
    h.remediator.on_alert(event)
    await settle(h)
    assert h.backend("qwen").calls == []
    assert h.metric("sentinel_worker_profile", worker="qwen", profile="reduced") == 1
    # A new episode of the same alert is a new decision.
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch", active_at_ms=99))
    await settle(h)
    assert h.backend("qwen").calls == [("restart", "fp8")]
    await h.remediator.close()


async def test_action_cut_short_by_shutdown_is_interrupted_and_reverification_failure_escalates(
    tmp_path: Path,
) -> None:
    cfg = policy(ladder=[{"action": "restart", "times": 1}])
    h = await started(Harness(tmp_path, cfg, [worker()]))
    backend = h.backend("qwen")
    backend.gate = asyncio.Event()
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch", active_at_ms=7))
    await backend.entered.wait()
    # The row is on disk before the backend was asked to act.
    with_row = Journal.in_dir(tmp_path)
    (on_disk,) = with_row.recent(1)
    with_row.close()
    assert on_disk.outcome is None and on_disk.action == "reduce_batch"
    await h.remediator.close()

    h2 = Harness(tmp_path, cfg, [worker()], wall=h.wall)
    h2.backend("qwen").heals = False
    await h2.remediator.start()
    await settle(h2)
    rows = await h2.remediator.actions_json(5)
    interrupted = [r for r in rows if r["outcome"] == "interrupted"]
    assert len(interrupted) == 1 and interrupted[0]["verify"] == "failed"
    # Not healthy after the interruption: the ladder goes on (restart on the new profile).
    assert h2.backend("qwen").calls == [("restart", "reduced")]
    h2.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch", active_at_ms=7))
    await settle(h2)
    assert h2.backend("qwen").calls == [("restart", "reduced")]
    await h2.remediator.close()


async def test_journaled_profile_survives_a_restart(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(), [worker()]))
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
    await settle(h)
    await h.remediator.close()
    h2 = await started(Harness(tmp_path, policy(), [worker()], wall=h.wall))
    assert h2.metric("sentinel_worker_profile", worker="qwen", profile="reduced") == 1
    await h2.remediator.close()


# -- the real process backend -------------------------------------------------------------------


async def test_real_process_backend_is_started_and_restarted_with_the_profile(tmp_path: Path) -> None:
    from sentinel.remediation.backends import ProcessBackend, build_backend

    state = tmp_path / "state"
    script = "import os, time; print('profile', os.environ.get('MAX_NUM_SEQS'), flush=True); time.sleep(60)"
    cfg = worker(endpoint=None, backend={"type": "process", "argv": [sys.executable, "-c", script]})
    backend = build_backend(cfg, state)
    assert isinstance(backend, ProcessBackend)
    h = Harness(state, policy(verify_timeout=10), [cfg], backends={"qwen": backend})
    try:
        await h.remediator.start()
        first = backend.pid
        assert first is not None  # supervised: started by Sentinel with the journaled profile
        log = state / "workers" / "qwen.log"
        await eventually(lambda: "profile 64" in log.read_text())
        h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
        await settle(h)
        assert h.outcomes()[-1] == ("reduce_batch", "succeeded")
        assert backend.pid not in (None, first)
        assert await backend.active_profile() == "reduced"
        await eventually(lambda: "profile 16" in log.read_text())
    finally:
        await h.remediator.close()
        await backend.close()
    assert backend.pid is None


async def test_live_control_errors_keep_the_profile_the_worker_still_runs(tmp_path: Path) -> None:
    class BrokenLive(FakeLive):
        async def set_batch_limit(self, worker: str, limit: int) -> None:
            raise ConnectionError("probe went away")

    h = Harness(tmp_path, policy(ladder=[]), [worker(probe=True)], live=BrokenLive())
    await h.remediator.start()
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch"))
    await settle(h)
    assert h.metric("sentinel_worker_profile", worker="qwen", profile="full") == 1
    assert any(r.outcome == "failed" and "probe went away" in r.detail for r in h.reports)
    await h.remediator.close()


@pytest.mark.parametrize("mode", ["act", "observe"])
async def test_workers_json_shows_mode_profile_and_backend_state(tmp_path: Path, mode: str) -> None:
    h = await started(Harness(tmp_path, policy(mode=mode), [worker()]))
    await h.remediator.tick()
    data = h.remediator.workers_json()
    assert data["mode"] == mode and not data["paused"]
    (w,) = data["workers"]
    assert (w["name"], w["profile"], w["profiles"], w["unit"], w["state"]) == (
        "qwen",
        "full",
        ["full", "reduced", "fp8"],
        "active",
        "ok",
    )
    assert FakeBackend.__name__ == w["backend"]
    await h.remediator.close()


class RecordingBackend(FakeBackend):
    """A backend that, like the systemd and process ones, records the profile it applied."""

    applied: str | None = None

    async def active_profile(self) -> str | None:
        return self.applied


async def test_backends_recorded_profile_places_a_worker_on_the_ladder_when_the_journal_has_none(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, policy(), [worker()], backends={"qwen": RecordingBackend("qwen")})
    h.backend("qwen").applied = "fp8"  # type: ignore[attr-defined]
    await h.remediator.start()
    assert h.metric("sentinel_worker_profile", worker="qwen", profile="fp8") == 1
    await h.remediator.close()


async def test_backends_recorded_profile_wins_over_a_journal_intent_it_never_applied(tmp_path: Path) -> None:
    journal = Journal.in_dir(tmp_path)
    journal.save_worker("qwen", WorkerRecord(profile="reduced"))
    journal.close()
    h = Harness(tmp_path, policy(), [worker()], backends={"qwen": RecordingBackend("qwen")})
    h.backend("qwen").applied = "full"  # type: ignore[attr-defined]
    await h.remediator.start()
    assert h.metric("sentinel_worker_profile", worker="qwen", profile="full") == 1
    await h.remediator.close()


async def test_reconfigure_switches_from_observe_to_act_with_fresh_budgets(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(mode="observe", budget={"count": 1, "window": 3600}), [worker()]))
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=1))
    await settle(h)
    h.remediator.reconfigure(policy(mode="act", budget={"count": 1, "window": 3600}))
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=2))
    await settle(h)
    assert h.backend("qwen").calls == [("restart", "full")]
    assert h.outcomes() == [("restart", "would_act"), ("restart", "started"), ("restart", "succeeded")]
    await h.remediator.close()


async def test_alert_refused_during_a_cooldown_is_acted_on_once_the_cooldown_passes(tmp_path: Path) -> None:
    # A crash right after a restart must not leave the worker dead: the second alert is
    # deferred, and acted on as soon as the cooldown allows, while it still fires.
    h = await started(Harness(tmp_path, policy(cooldown=60), [worker()]))
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=1))
    await settle(h)
    h.wall.advance(10)
    h.remediator.on_alert(firing("EngineDead", worker="qwen", action="restart", active_at_ms=h.wall.ms))
    await settle(h)
    assert len(h.backend("qwen").calls) == 1
    still_firing = {"alertname": "EngineDead", "worker": "qwen", "alertstate": "firing"}
    for _ in range(3):  # ticks inside the cooldown: still waiting, journaled once
        h.wall.advance(10)
        h.store.add("ALERTS", 1.0, still_firing, timestamp_ms=h.wall.ms)
        await h.remediator.tick()
        await settle(h)
    assert len(h.backend("qwen").calls) == 1
    assert sum(r.outcome == "skipped" for r in h.reports) == 1
    h.wall.advance(31)
    h.store.add("ALERTS", 1.0, still_firing, timestamp_ms=h.wall.ms)
    await h.remediator.tick()
    await settle(h)
    assert len(h.backend("qwen").calls) == 2
    await h.remediator.close()


async def test_deferred_request_is_dropped_when_its_alert_resolves(tmp_path: Path) -> None:
    h = await started(Harness(tmp_path, policy(cooldown=60), [worker()]))
    h.remediator.on_alert(firing("EngineStalled", worker="qwen", action="restart", active_at_ms=1))
    await settle(h)
    h.wall.advance(10)
    h.remediator.on_alert(firing("EngineDead", worker="qwen", action="restart", active_at_ms=2))
    await settle(h)
    h.wall.advance(61)  # no ALERTS sample: the alert resolved meanwhile
    await h.remediator.tick()
    await settle(h)
    assert len(h.backend("qwen").calls) == 1
    await h.remediator.close()


async def test_deferred_request_is_dropped_when_another_action_healed_the_worker_since(tmp_path: Path) -> None:
    # EngineDead fires with the CUDA OOM that reduce_batch fixes: no restart afterwards.
    h = await started(Harness(tmp_path, policy(cooldown=60), [worker()]))
    h.remediator.on_alert(firing("CudaOOM", worker="qwen", action="reduce_batch", active_at_ms=h.wall.ms))
    h.remediator.on_alert(firing("EngineDead", worker="qwen", action="restart", active_at_ms=h.wall.ms))
    await settle(h)
    assert len(h.backend("qwen").calls) == 1
    h.wall.advance(61)
    h.store.add(
        "ALERTS", 1.0, {"alertname": "EngineDead", "worker": "qwen", "alertstate": "firing"}, timestamp_ms=h.wall.ms
    )
    await h.remediator.tick()
    await settle(h)
    assert len(h.backend("qwen").calls) == 1
    await h.remediator.close()
