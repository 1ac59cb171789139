"""The simulated GPU host: pynvml's shapes and errors, scenarios that behave as named."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from sentinel.sim import ScenarioError, SimulatedNvml, list_scenarios, load_scenario, parse_scenario
from sentinel.sim.nvml import RampSignal, SineSignal
from tests.support import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sims() -> Iterator[list[SimulatedNvml]]:
    made: list[SimulatedNvml] = []
    yield made
    for sim in made:
        sim.close()  # release any hang a test left behind


def start(name_or_text: str, clock: FakeClock, sims: list[SimulatedNvml]) -> SimulatedNvml:
    scenario = parse_scenario(name_or_text) if "\n" in name_or_text else load_scenario(name_or_text)
    sim = SimulatedNvml(scenario, clock=clock)
    sim.nvmlInit()
    sims.append(sim)
    return sim


def drain_events(sim: SimulatedNvml, event_set: Any) -> list[tuple[int, int]]:
    events: list[tuple[int, int]] = []
    while True:
        try:
            data = sim.nvmlEventSetWait(event_set, 0)
        except pynvml.NVMLError_Timeout:
            return events
        events.append((data.device.index, data.eventData))  # GetIndex would fail for a lost GPU


def xid_set(sim: SimulatedNvml) -> Any:
    event_set = sim.nvmlEventSetCreate()
    for i in range(sim.nvmlDeviceGetCount()):
        sim.nvmlDeviceRegisterEvents(sim.nvmlDeviceGetHandleByIndex(i), pynvml.nvmlEventTypeXidCriticalError, event_set)
    return event_set


# -- shipped scenarios ------------------------------------------------------------------


def test_the_four_scenarios_are_shipped() -> None:
    assert set(list_scenarios()) >= {"healthy-8gpu", "gpu-lost", "xid-storm", "hung-driver"}


@pytest.mark.parametrize("name", ["healthy-8gpu", "gpu-lost", "xid-storm", "hung-driver"])
def test_each_shipped_scenario_loads_with_eight_distinct_gpus(name: str) -> None:
    scenario = load_scenario(name)
    gpus = scenario.resolved_gpus()
    assert scenario.name == name and scenario.description
    assert len(gpus) == 8
    assert len({g.uuid for g in gpus}) == 8 and len({g.pci_bus_id for g in gpus}) == 8


def test_healthy_8gpu_answers_everything_with_plausible_values(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("healthy-8gpu", clock, sims)
    event_set = xid_set(sim)
    for t in (0.0, 17.0, 45.0, 300.0):
        clock.t = t
        for i in range(8):
            h = sim.nvmlDeviceGetHandleByIndex(i)
            util = sim.nvmlDeviceGetUtilizationRates(h)
            assert 50 <= util.gpu <= 90
            mem = sim.nvmlDeviceGetMemoryInfo(h)
            assert mem.used + mem.free == mem.total and mem.used > 0
            assert 55 <= sim.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) <= 70
            assert 380_000 <= sim.nvmlDeviceGetPowerUsage(h) <= 520_000  # milliwatts
            assert sim.nvmlDeviceGetCurrentClocksEventReasons(h) == 0
    assert drain_events(sim, event_set) == []


def test_gpu_lost_loses_gpu_3_at_20s_with_xid_79(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("gpu-lost", clock, sims)
    event_set = xid_set(sim)
    h3 = sim.nvmlDeviceGetHandleByIndex(3)
    clock.t = 19.9
    assert sim.nvmlDeviceGetPowerUsage(h3) > 0
    assert drain_events(sim, event_set) == []
    clock.t = 20.0
    assert drain_events(sim, event_set) == [(3, 79)]
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        sim.nvmlDeviceGetPowerUsage(h3)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        sim.nvmlDeviceGetHandleByIndex(3)
    for i in (0, 1, 2, 4, 5, 6, 7):
        assert sim.nvmlDeviceGetPowerUsage(sim.nvmlDeviceGetHandleByIndex(i)) > 0
    assert sim.nvmlDeviceGetCount() == 8  # NVML still enumerates a lost GPU


def test_xid_storm_delivers_every_event_of_the_storm(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("xid-storm", clock, sims)
    event_set = xid_set(sim)
    clock.t = 60.0
    events = drain_events(sim, event_set)
    assert len(events) == 80
    assert {gpu for gpu, _ in events} == {5}
    assert sorted({xid for _, xid in events}) == [13, 31]
    h5 = sim.nvmlDeviceGetHandleByIndex(5)
    assert sim.nvmlDeviceGetUtilizationRates(h5).gpu > 0  # application Xids: the GPU stays up


def test_hung_driver_blocks_gpu_2_power_reads_until_the_hang_ends(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("hung-driver", clock, sims)
    h2 = sim.nvmlDeviceGetHandleByIndex(2)
    clock.t = 10.0
    assert sim.nvmlDeviceGetPowerUsage(h2) > 0  # before the hang: immediate
    clock.t = 15.0
    result: list[int] = []
    caller = threading.Thread(target=lambda: result.append(sim.nvmlDeviceGetPowerUsage(h2)), daemon=True)
    caller.start()
    caller.join(0.3)
    assert caller.is_alive(), "the call should hang"
    started = time.perf_counter()
    assert sim.nvmlDeviceGetTemperature(h2, pynvml.NVML_TEMPERATURE_GPU) > 0  # other calls still answer
    assert sim.nvmlDeviceGetPowerUsage(sim.nvmlDeviceGetHandleByIndex(3)) > 0  # and other GPUs
    assert time.perf_counter() - started < 2.0  # blocked, they would wait for the fake clock: forever
    clock.t = 35.0
    caller.join(1.0)
    assert not caller.is_alive() and result and result[0] > 0


def test_hang_follows_a_real_clock(sims: list[SimulatedNvml]) -> None:
    text = "name: short-hang\ngpus: 1\nhangs: [{gpu: 0, function: nvmlDeviceGetUUID, at_s: 0, duration_s: 0.3}]\n"
    sim = SimulatedNvml(parse_scenario(text))
    sims.append(sim)
    sim.nvmlInit()
    h = sim.nvmlDeviceGetHandleByIndex(0)
    started = time.perf_counter()
    assert sim.nvmlDeviceGetUUID(h).startswith("GPU-")
    assert 0.25 <= time.perf_counter() - started < 2.0


# -- pynvml's shapes and errors -------------------------------------------------------


def test_structures_have_pynvml_shapes(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    text = "name: shapes\ngpus:\n  - {processes: [{pid: 4242, used_memory_bytes: 1073741824}]}\n"
    sim = start(text, clock, sims)
    h = sim.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(sim.nvmlSystemGetDriverVersion(), str)
    assert sim.nvmlDeviceGetPciInfo(h).busId == "00000000:18:00.0"
    assert sim.nvmlDeviceGetUUID(h).startswith("GPU-")
    mem = sim.nvmlDeviceGetMemoryInfo(h)
    assert (mem.total, mem.used, mem.free) == (85_520_809_984, 0, 85_520_809_984)
    util = sim.nvmlDeviceGetUtilizationRates(h)
    assert (util.gpu, util.memory) == (0, 0)
    [proc] = sim.nvmlDeviceGetComputeRunningProcesses(h)
    assert (proc.pid, proc.usedGpuMemory) == (4242, 1073741824)
    assert sim.nvmlDeviceGetRemappedRows(h) == (0, 0, 0, 0)
    assert sim.nvmlDeviceGetNvLinkState(h, 0) == pynvml.NVML_FEATURE_ENABLED
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetNvLinkState(h, 18)
    assert sim.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) == 345  # idle: 0 % utilization


def test_calls_before_init_raise_uninitialized(clock: FakeClock) -> None:
    sim = SimulatedNvml(load_scenario("healthy-8gpu"), clock=clock)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        sim.nvmlDeviceGetCount()
    sim.nvmlInit()
    assert sim.nvmlDeviceGetCount() == 8
    sim.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        sim.nvmlDeviceGetHandleByIndex(0)


def test_unsupported_fields_raise_pynvmls_not_supported(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("name: old-card\ngpus:\n  - {unsupported: [ecc, energy, nvlink]}\n  - {}\n", clock, sims)
    h0, h1 = sim.nvmlDeviceGetHandleByIndex(0), sim.nvmlDeviceGetHandleByIndex(1)
    for call in (
        lambda h: sim.nvmlDeviceGetTotalEccErrors(h, 1, pynvml.NVML_VOLATILE_ECC),
        sim.nvmlDeviceGetTotalEnergyConsumption,
        lambda h: sim.nvmlDeviceGetNvLinkState(h, 0),
    ):
        with pytest.raises(pynvml.NVMLError_NotSupported) as info:
            call(h0)
        assert type(info.value) is pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED).__class__
        call(h1)  # the other GPU has them


def test_lost_gpu_can_recover_and_use_another_error(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("name: reset\ngpus: 2\nlost: [{gpu: 1, at_s: 5, until_s: 10, error: reset_required}]\n", clock, sims)
    h1 = sim.nvmlDeviceGetHandleByIndex(1)
    clock.t = 6
    with pytest.raises(pynvml.NVMLError_ResetRequired):
        sim.nvmlDeviceGetName(h1)
    clock.t = 10
    assert sim.nvmlDeviceGetName(h1) == "NVIDIA H100 80GB HBM3"


def test_event_wait_times_out_with_nvml_timeout(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("healthy-8gpu", clock, sims)
    event_set = xid_set(sim)
    started = time.perf_counter()
    with pytest.raises(pynvml.NVMLError_Timeout):
        sim.nvmlEventSetWait(event_set, 100)
    assert 0.09 <= time.perf_counter() - started < 2.0
    sim.nvmlEventSetFree(event_set)


def test_injected_xid_wakes_a_waiting_thread_at_once(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("healthy-8gpu", clock, sims)
    event_set = xid_set(sim)
    got: list[tuple[float, int]] = []

    def wait() -> None:
        data = sim.nvmlEventSetWait(event_set, 2000)
        got.append((time.perf_counter(), data.eventData))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    sent = time.perf_counter()
    sim.inject_xid(6, 48)
    waiter.join(2)
    assert got and got[0][1] == 48 and got[0][0] - sent < 0.05


def test_ecc_xids_raise_the_uncorrected_count(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("name: dbe\ngpus: 1\nxids: [{gpu: 0, xid: 48, at_s: 3}]\n", clock, sims)
    h = sim.nvmlDeviceGetHandleByIndex(0)
    uncorrected = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    assert sim.nvmlDeviceGetTotalEccErrors(h, uncorrected, pynvml.NVML_VOLATILE_ECC) == 0
    clock.t = 3
    assert sim.nvmlDeviceGetTotalEccErrors(h, uncorrected, pynvml.NVML_VOLATILE_ECC) == 1


def test_hot_gpu_reports_thermal_slowdown(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("name: hot\ngpus: 1\ngpu_defaults: {temperature_celsius: 90, utilization: 0.9}\n", clock, sims)
    h = sim.nvmlDeviceGetHandleByIndex(0)
    assert sim.nvmlDeviceGetCurrentClocksEventReasons(h) & pynvml.nvmlClocksThrottleReasonSwThermalSlowdown
    assert sim.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) < 1980


def test_energy_integrates_power_and_never_decreases(clock: FakeClock, sims: list[SimulatedNvml]) -> None:
    sim = start("name: e\ngpus: 1\ngpu_defaults: {power_watts: 500}\n", clock, sims)
    h = sim.nvmlDeviceGetHandleByIndex(0)
    clock.t = 10.0
    assert sim.nvmlDeviceGetTotalEnergyConsumption(h) == 5_000_000  # 500 W x 10 s in mJ
    clock.t = 5.0  # a clock that goes back must not make the counter go back
    assert sim.nvmlDeviceGetTotalEnergyConsumption(h) == 5_000_000


# -- signals ----------------------------------------------------------------------------


def test_signals_are_simple_functions_of_time() -> None:
    sine = SineSignal(kind="sine", mean=0.5, amplitude=0.2, period_s=40)
    assert sine.at(0) == pytest.approx(0.5)
    assert sine.at(10) == pytest.approx(0.7)
    assert sine.at(30) == pytest.approx(0.3)
    ramp = RampSignal.model_validate({"kind": "ramp", "from": 100, "to": 300, "start_s": 10, "duration_s": 20})
    assert [ramp.at(t) for t in (0, 10, 20, 30, 99)] == [100, 100, 200, 300, 300]
    assert not math.isnan(sine.at(1e9))


# -- loading and errors ---------------------------------------------------------------------


def test_scenario_loads_from_a_file_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ngpus: 2\n")
    assert load_scenario(path).gpu_count == 2
    assert load_scenario(str(path)).name == "mine"


def test_broken_scenario_file_names_the_field_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        "name: broken\n"
        "gpus: 4\n"
        "gpu_defaults:\n"
        "  unsupported: [ecc, eccc]\n"
        "  utilization: {kind: sine, mean: 0.5}\n"
        "xids:\n"
        "  - {gpu: 7, xid: 79, at_s: 1}\n"
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert f"{path}:4:" in message and "gpu_defaults.unsupported.1" in message
    assert "gpu_defaults.utilization.period_s: Field required" in message
    with pytest.raises(ScenarioError, match=r"broken.yaml:7:\d+: xids\.3\.gpu: GPU 7 does not exist"):
        path.write_text(
            "name: broken\ngpus: 4\nxids:\n"
            "  - {gpu: 1, xid: 79, at_s: 1}\n"
            "  - {gpu: 2, xid: 13, at_s: 1}\n"
            "  - {gpu: 3, xid: 1, at_s: 1}\n"
            "  - {gpu: 7, xid: 79, at_s: 1}\n"
        )
        load_scenario(path)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (
            "name: x\ngpus: 2\nhangs: [{gpu: 0, function: nvmlDeviceGetPower, at_s: 1, duration_s: 1}]\n",
            "hangs.0.function",
        ),
        ("name: x\ngpus: 2\nlost: [{gpu: 0, at_s: 5, until_s: 2}]\n", "lost.0"),
        ("name: x\ngpus: 2\nbogus: 1\n", "bogus: unknown key"),
        ("name: x\ngpus: 0\n", "gpus: a host has 1 to 64 GPUs"),
        ("gpus: 2\n", "name: Field required"),
        ("name: x\ngpus: 2\nxids: [{gpu: 0, xid: 79, at_s: 1, every_s: 0}]\n", "xids.0.every_s"),
    ],
)
def test_scenario_errors_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ScenarioError, match=r"s\.yaml:\d+:\d+: " + field.replace(".", r"\.")):
        parse_scenario(text, "s.yaml")


def test_unknown_scenario_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ScenarioError, match="one of gpu-lost, healthy-8gpu, hung-driver, xid-storm"):
        load_scenario("gpu-lots")


def test_sim_does_not_import_torch() -> None:
    code = "import sys, sentinel.sim, sentinel.sim.nvml; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
