"""The test worker's expert parallelism: dispatch by placement, measured load, live placement changes.

In-process engines over the tiny model for the placement mechanics (fast, exact), and
one real `python -m sentinel.sim.worker` under load with the skew knobs for the whole
path: skewed routing, a plan from the planner, the placement applied over HTTP while
clients keep requesting, the EPLB line's balancedness back up, no failed request.

Tolerances: on the same traffic, the measured balancedness (tokens each device really
computed) and the planner's prediction for those counts differ only by how replicas
round an expert's tokens (each gets floor or ceil of its share): within 0.02 here.
Between the window a plan was made from and the traffic after it, the routing itself
differs; with the skew fault's bias of 10 it is nearly fixed, so within 0.05.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import require_module

require_module("torch")
require_module("transformers")

import torch  # noqa: E402

from sentinel.moe import EMPTY, Placement, PlannerSettings, plan_rebalance  # noqa: E402
from sentinel.sim.load import LoadGenerator  # noqa: E402
from sentinel.sim.worker.control import MessageError, apply_placement_message, placement_ack  # noqa: E402
from sentinel.sim.worker.engine import Completion, ServingEngine  # noqa: E402
from sentinel.sim.worker.eplb import balance  # noqa: E402
from sentinel.sim.worker.model import TinyMoe, build_model  # noqa: E402
from tests.test_sim_worker import EPLB, WorkerProcess  # noqa: E402

SAME_WINDOW_TOLERANCE = 0.02
NEXT_WINDOW_TOLERANCE = 0.05


class Results:
    """Completions of submitted requests, collected from the engine thread."""

    def __init__(self) -> None:
        self.done: dict[int, Completion | BaseException] = {}
        self._cv = threading.Condition()

    def callback(self, key: int) -> Callable[[Completion | BaseException], None]:
        def done(result: Completion | BaseException) -> None:
            with self._cv:
                self.done[key] = result
                self._cv.notify_all()

        return done

    def wait(self, n: int, timeout: float = 120.0) -> dict[int, Completion | BaseException]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self.done) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.done)} of {n} requests finished"
                self._cv.wait(left)
            return dict(self.done)


@pytest.fixture
def engine() -> Iterator[ServingEngine]:
    torch.set_num_threads(1)
    e = ServingEngine(build_model("none"), max_num_seqs=4, model_name="m")
    e.start()
    try:
        yield e
    finally:
        e.stop()


def prompts(n: int, seed: int = 0, length: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(33, 127, (n, length), generator=g).tolist()


def serve(engine: ServingEngine, batch: list[list[int]], max_tokens: int = 8) -> dict[int, Completion | BaseException]:
    results = Results()
    for i, p in enumerate(batch):
        engine.submit(p, max_tokens, results.callback(i), ignore_eos=True)
    return results.wait(len(batch))


def shuffled_placement(moe: TinyMoe) -> Placement:
    """Every expert moved to another device, and experts 0 and 5 replicated everywhere."""
    current = moe.ep.placement
    layers = []
    for layer in current.layers:
        devices = [list(d) for d in layer[1:]] + [list(layer[0])]  # rotate the devices
        for d in devices:
            free = [s for s, e in enumerate(d) if e == EMPTY]
            for slot, e in zip(free, (0, 5), strict=True):
                if e not in d:
                    d[slot] = e
        layers.append(devices)
    return Placement.from_lists(current.num_experts, layers)


# -- mechanics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_outputs_do_not_depend_on_where_experts_live(quantization: str) -> None:
    moe = build_model(quantization)
    engine = ServingEngine(moe, max_num_seqs=4, model_name="m")
    ids = torch.tensor(prompts(4, seed=3))
    try:
        with torch.inference_mode():
            before = moe.model(input_ids=ids).logits
        target = shuffled_placement(moe)
        staged = moe.ep.stage(target)
        assert len(staged.copies) == 2 * (16 + 6)  # per layer: 16 moved, 6 new replicas of 0 and 5
        moe.ep.commit(staged)  # no engine thread running: commit directly
        assert moe.ep.placement == target
        with torch.inference_mode():
            after = moe.model(input_ids=ids).logits
    finally:
        engine.stop()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_replicas_split_their_experts_tokens_evenly_and_devices_count_them(engine: ServingEngine) -> None:
    moe = engine.moe
    engine.set_skew((0, 1), 10.0)  # every token to experts 0 and 1, both on device 0
    layer = [[0, 1, 2, 3, EMPTY, EMPTY], [4, 5, 6, 7, 0, 1], [8, 9, 10, 11, 0, 1], [12, 13, 14, 15, 0, 1]]
    result = engine.apply_placement(Placement.from_lists(16, [layer, layer]), timeout_s=30)
    assert result.status == "applied", result
    engine.ep.take_window()
    serve(engine, prompts(7, seed=4, length=5), max_tokens=11)  # odd counts: splits cannot all be exact
    window = engine.ep.take_window()
    logical = engine.expert_load.take_window()
    for li in range(2):
        total = int(logical[li].sum())
        assert sum(window[li]) == total  # every routed assignment computed on exactly one device
        assert max(window[li]) - min(window[li]) <= 2, window  # 2 experts, each within 1 token per replica
    assert moe.ep.replica_bytes == 2 * 6 * moe.ep.expert_bytes


def test_measured_balancedness_matches_the_planners_prediction(engine: ServingEngine) -> None:
    engine.set_skew((3, 6, 9), 2.5)  # three hot experts on three devices, the rest still routed
    engine.expert_load.take_window()
    serve(engine, prompts(16, seed=5), max_tokens=12)
    counts = engine.expert_load.take_window().tolist()
    plan = plan_rebalance(counts, engine.ep.placement, PlannerSettings(expert_bytes=engine.ep.expert_bytes))
    assert plan.changed and plan.balancedness_after is not None and plan.balancedness_before is not None
    assert plan.balancedness_after > plan.balancedness_before + 0.1
    result = engine.apply_placement(plan.placement, timeout_s=30)
    assert result.status == "applied" and result.copies == len(plan.copies)

    engine.ep.take_window()
    serve(engine, prompts(16, seed=6), max_tokens=12)
    measured = balance(torch.tensor(engine.ep.take_window())).balancedness
    after_counts = engine.expert_load.take_window().tolist()
    predicted_same_window = plan.placement.balancedness(after_counts)
    assert predicted_same_window is not None
    print(
        f"\nplanned from window 1: {plan.balancedness_before:.3f} -> {plan.balancedness_after:.3f}; "
        f"window 2 measured {measured:.3f}, predicted for its counts {predicted_same_window:.3f}"
    )
    assert abs(measured - predicted_same_window) <= SAME_WINDOW_TOLERANCE
    assert measured > plan.balancedness_before + 0.05


def test_a_plan_applied_under_load_fails_no_request_and_lands_between_steps(engine: ServingEngine) -> None:
    engine.set_skew((0, 1), 10.0)
    results = Results()
    batch = prompts(24, seed=7)
    for i, p in enumerate(batch):
        engine.submit(p, 16, results.callback(i), ignore_eos=True)
    deadline = time.monotonic() + 60
    while engine.steps < 5:
        assert time.monotonic() < deadline, "the engine makes no progress"
        time.sleep(0.01)
    counts = engine.expert_load.totals().tolist()
    plan = plan_rebalance(counts, engine.ep.placement)
    result = engine.apply_placement(plan.placement, timeout_s=30)
    done = results.wait(len(batch))
    assert result.status == "applied", result
    assert result.step is not None and 5 <= result.step < engine.steps  # swapped in while serving
    assert all(isinstance(r, Completion) and r.completion_tokens == 16 for r in done.values()), done
    assert engine.state()["experts"]["placement_version"] == 1


def test_a_stalled_engine_times_out_and_keeps_the_old_placement(engine: ServingEngine) -> None:
    old = engine.ep.placement
    engine.stall(3.0)
    result = engine.apply_placement(shuffled_placement(engine.moe), timeout_s=0.5)
    assert result.status == "timed_out", result
    assert "no step boundary within 0.5s" in result.reason and result.version == 0
    serve(engine, prompts(2, seed=8), max_tokens=4)  # after the stall: the withdrawn plan never lands
    assert engine.ep.placement == old and engine.placement_version == 0


def test_plans_that_do_not_fit_are_refused_with_the_reason_and_change_nothing(engine: ServingEngine) -> None:
    moe = engine.moe
    old = engine.ep.placement
    four_slots = Placement.contiguous(2, 16, 4)  # the worker has 6 slots per device
    result = engine.apply_placement(four_slots, timeout_s=5)
    assert result.status == "refused" and "this worker has 4 devices with [6, 6, 6, 6] slots" in result.reason
    five_devices = Placement.contiguous(2, 16, 5, 2)
    assert "4 devices" in engine.apply_placement(five_devices, timeout_s=5).reason
    one_layer = Placement.contiguous(1, 16, 4, 2)
    assert "this worker serves 2 layers of 16" in engine.apply_placement(one_layer, timeout_s=5).reason

    target = shuffled_placement(moe)
    engine.set_memory_budget(moe.weights_bytes + 10 * moe.ep.expert_bytes)  # room for 10 staged copies, not 44
    result = engine.apply_placement(target, timeout_s=5)
    assert result.status == "refused" and "over the memory budget" in result.reason, result
    assert result.copies == 44
    engine.set_memory_budget(None)
    assert engine.ep.placement == old and engine.placement_version == 0

    assert engine.apply_placement(target, version=3, timeout_s=30).status == "applied"
    stale = engine.apply_placement(old, version=2, timeout_s=5)
    assert stale.status == "refused" and "version 2 is not newer than the running version 3" in stale.reason


def test_rolling_back_is_applying_the_old_placement_as_a_new_version(engine: ServingEngine) -> None:
    old = engine.ep.placement
    target = shuffled_placement(engine.moe)
    first = engine.apply_placement(target, timeout_s=30)  # the idle engine swaps at once
    assert first.status == "applied" and first.version == 1 and first.copies == 44
    back = engine.apply_placement(old, timeout_s=30)
    assert back.status == "applied" and back.version == 2 and engine.ep.placement == old
    assert back.copies == 32  # every expert returns home; the replicas are simply dropped
    assert engine.ep.replica_bytes == 0
    again = engine.apply_placement(old, timeout_s=30)
    assert again.status == "applied" and again.copies == 0 and "already runs" in again.reason


def test_placement_messages_are_parsed_applied_and_acknowledged_with_a_digest(engine: ServingEngine) -> None:
    old = engine.ep.placement
    target = shuffled_placement(engine.moe)
    assert placement_ack(engine) == {"version": 0, "step": None, "digest": old.digest()}
    ack = apply_placement_message(engine, {"version": 4, "timeout_s": 30, "placement": target.to_json()})
    assert (ack["status"], ack["version"], ack["digest"]) == ("applied", 4, target.digest())
    refused = apply_placement_message(engine, {"placement": Placement.contiguous(2, 16, 4).to_json()})
    assert refused["status"] == "refused" and refused["digest"] == target.digest()  # what still runs
    assert placement_ack(engine)["version"] == 4
    bad_messages = [
        ([1], "placement message: expected an object"),
        ({"version": 5}, "placement: expected an object"),
        ({"placement": target.to_json(), "version": 0}, "version: expected a positive integer"),
        ({"placement": target.to_json(), "timeout_s": -1}, r"timeout_s: expected seconds in \(0, 300\]"),
        ({"placement": {"num_experts": 16, "layers": [[[0, "x"]]]}}, r"placement.layers\[0\]\[0\]\[1\]"),
    ]
    for message, error in bad_messages:
        with pytest.raises(MessageError, match=error):
            apply_placement_message(engine, message)
    assert engine.placement_version == 4


# -- the real worker over HTTP --------------------------------------------------------------------


async def test_skewed_worker_is_rebalanced_live_over_http_without_a_failed_request() -> None:
    worker = WorkerProcess(MAX_NUM_SEQS="4", SKEW_EXPERTS="0,1", SKEW_BIAS="10").wait_ready()
    gen = LoadGenerator(worker.base, concurrency=8, prompt_len=16, max_tokens=24, seed=3)
    gen.start()
    try:
        skewed = float((await worker.log(EPLB, timeout=30, since=worker.mark())).group(1))
        _, before = await worker.request("GET", "/admin/state")
        await worker.log(EPLB, timeout=30, since=worker.mark())
        _, after = await worker.request("GET", "/admin/state")
        # The planner's input: tokens per expert over the window between two snapshots.
        window = [
            [b - a for a, b in zip(la, lb, strict=True)]
            for la, lb in zip(before["experts"]["tokens"], after["experts"]["tokens"], strict=True)
        ]
        _, running = await worker.request("GET", "/admin/placement")
        current = Placement.from_json(running["placement"])
        plan = plan_rebalance(window, current, PlannerSettings(expert_bytes=running["expert_bytes"]))
        status, ack = await worker.request(
            "POST", "/admin/placement", {"placement": plan.placement.to_json(), "version": 1, "timeout_s": 30}
        )
        assert status == 200 and ack["status"] == "applied" and ack["version"] == 1, ack
        assert ack["copies"] == len(plan.copies) and ack["digest"] == plan.placement.digest()
        mark = worker.mark()
        await worker.log(EPLB, timeout=30, since=mark)  # a window that may straddle the swap
        healed = float((await worker.log(EPLB, timeout=30, since=worker.mark())).group(1))
        status, bad = await worker.request("POST", "/admin/placement", {"placement": {"num_experts": 16}})
        assert status == 400 and "placement.layers" in bad["error"]["message"]
        status, stale = await worker.request("POST", "/admin/placement", {"placement": current.to_json(), "version": 1})
        assert status == 409 and "not newer" in stale["reason"]
    finally:
        stats = await gen.stop()
        code = worker.stop()
    assert code == 0, "\n".join(worker.lines[-30:])
    print(f"\nskewed {skewed:.3f}, planned {plan.balancedness_after:.3f}, measured after the swap {healed:.3f}")
    assert skewed < 0.3
    assert plan.balancedness_after is not None and abs(healed - plan.balancedness_after) <= NEXT_WINDOW_TOLERANCE
    assert stats.successes > 0 and stats.failures == 0, stats.errors
    assert any("Expert placement version 1 in from step" in line for line in worker.lines)


def test_a_placement_waiting_for_a_dead_engine_is_refused_at_once() -> None:
    torch.set_num_threads(1)
    moe = build_model("none")
    engine = ServingEngine(moe, max_num_seqs=4, model_name="m", stderr=io.StringIO())
    engine.start()
    try:
        engine.crash(after_seconds=1.0)  # the loop hangs, then dies before any step boundary
        started = time.monotonic()
        result = engine.apply_placement(shuffled_placement(moe), timeout_s=60)
        assert result.status == "refused" and "the engine died" in result.reason, result
        assert time.monotonic() - started < 30  # answered at death, not at the timeout
        assert engine.ep.placement == Placement.contiguous(2, 16, 4, 2) and engine.placement_version == 0
        after = engine.apply_placement(shuffled_placement(moe), timeout_s=5)
        assert after.status == "refused" and "the engine is dead" in after.reason
    finally:
        engine.stop()
