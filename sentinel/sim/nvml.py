"""A simulated GPU host behind the `pynvml` API, driven by a scenario file.

`SimulatedNvml(load_scenario("gpu-lost"))` has the functions of the `pynvml` module
that Sentinel calls, with the same names, arguments and return shapes (pynvml's own
ctypes structures where it returns them), and it raises pynvml's own error classes
(`pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)` is an `NVMLError_GpuIsLost`). The
real collector runs against it unchanged.

A scenario is YAML (see `sentinel/sim/scenarios/`):

    name: gpu-lost
    description: GPU 3 falls off the bus 20 s in.
    gpu_defaults:                 # every GPU, unless its own entry says otherwise
      name: NVIDIA H100 80GB HBM3
      utilization: {kind: sine, mean: 0.7, amplitude: 0.2, period_s: 60}
    gpus: 8                       # or a list of per-GPU entries (name, uuid, pci_bus_id, ...)
    xids: [{gpu: 3, xid: 79, at_s: 20}]            # repeat: N, every_s: S for storms
    lost: [{gpu: 3, at_s: 20}]                     # until_s: recovery; error: gpu_is_lost | ...
    hangs: [{gpu: 2, function: nvmlDeviceGetPowerUsage, at_s: 15, duration_s: 20}]
    control_file: /tmp/host-b.faults.json           # optional: faults injected while running

A `control_file` lets a program outside the process (the fleet demo drives several
`sentinel run --simulate` daemons) inject faults while the simulator runs. It holds
`{"lost": [3], "xids": [[3, 79]]}`: GPUs lost from now on (one taken out of the list
answers again, as after a reset), and Xid events raised once each (the list only
grows). It is re-read when its modification time changes, at most every 0.2 s, by
whichever NVML call comes first; a file that is missing or not such JSON changes nothing.

Values that change over time are signals: a number (constant), or
`{kind: constant, value}`, `{kind: sine, mean, amplitude, period_s, phase}` (phase in
periods), `{kind: ramp, from, to, start_s, duration_s}` (holds `to` afterwards).
Ratios (utilization, memory_utilization, memory_used_ratio) are clamped to 0..1.
Time is seconds since the simulator was built, read from `clock` (injectable).
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid as uuidlib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import pynvml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from sentinel.config.yamlpos import YamlError, load_with_positions, position_of

__all__ = [
    "FIELD_FUNCTIONS",
    "SIMULATED_FUNCTIONS",
    "GpuSpec",
    "Scenario",
    "ScenarioError",
    "SimDevice",
    "SimEventData",
    "SimProcessInfo",
    "SimulatedNvml",
    "list_scenarios",
    "load_scenario",
    "parse_scenario",
]

# Field names a scenario may mark unsupported, and the NVML functions that then raise
# NVMLError_NotSupported for that GPU.
FIELD_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "utilization": ("nvmlDeviceGetUtilizationRates",),
    "memory": ("nvmlDeviceGetMemoryInfo",),
    "temperature": ("nvmlDeviceGetTemperature",),
    "power": ("nvmlDeviceGetPowerUsage",),
    "power_limit": ("nvmlDeviceGetEnforcedPowerLimit",),
    "energy": ("nvmlDeviceGetTotalEnergyConsumption",),
    "sm_clock": ("nvmlDeviceGetClockInfo",),
    "clock_event_reasons": ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"),
    "ecc": ("nvmlDeviceGetTotalEccErrors",),
    "remapped_rows": ("nvmlDeviceGetRemappedRows",),
    "pcie_replay": ("nvmlDeviceGetPcieReplayCounter",),
    "nvlink": ("nvmlDeviceGetNvLinkState",),
    "processes": ("nvmlDeviceGetComputeRunningProcesses",),
    "xid_events": ("nvmlDeviceRegisterEvents",),
}

# Per-device functions (the ones a scenario can make hang).
DEVICE_FUNCTIONS: tuple[str, ...] = (
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetIndex",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetPciInfo",
    *sorted({f for fs in FIELD_FUNCTIONS.values() for f in fs}),
)
SIMULATED_FUNCTIONS: tuple[str, ...] = (
    "nvmlInit",
    "nvmlShutdown",
    "nvmlSystemGetDriverVersion",
    "nvmlDeviceGetCount",
    *DEVICE_FUNCTIONS,
    "nvmlEventSetCreate",
    "nvmlEventSetWait",
    "nvmlEventSetFree",
)

SHIPPED_SCENARIOS_PACKAGE = "sentinel.sim"
# Bus numbers of an 8-GPU HGX board, so simulated PCI ids look like real ones.
_HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
_UUID_NAMESPACE = uuidlib.UUID("5e7a1e00-0000-4000-8000-000000000000")
_MAX_GPUS = 64
_ECC_UNCORRECTED_XIDS = frozenset({48, 94, 95, 140})
_WAIT_SLICE_S = 0.05  # hangs and event waits re-read the (maybe fake) clock this often


# -- scenario model ----------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ConstantSignal(_Model):
    kind: Literal["constant"] = "constant"
    value: float

    def at(self, t: float) -> float:
        return self.value


class SineSignal(_Model):
    kind: Literal["sine"]
    mean: float
    amplitude: float
    period_s: float = Field(gt=0)
    phase: float = Field(0.0, description="Offset in periods (0.25 starts at the peak).")

    def at(self, t: float) -> float:
        return self.mean + self.amplitude * math.sin(2 * math.pi * (t / self.period_s + self.phase))


class RampSignal(_Model):
    kind: Literal["ramp"]
    from_: float = Field(alias="from")
    to: float
    start_s: float = Field(0.0, ge=0)
    duration_s: float = Field(gt=0)

    def at(self, t: float) -> float:
        progress = min(1.0, max(0.0, (t - self.start_s) / self.duration_s))
        return self.from_ + (self.to - self.from_) * progress


def _number_as_constant(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"kind": "constant", "value": value}
    return value


Signal = Annotated[
    ConstantSignal | SineSignal | RampSignal,
    Field(discriminator="kind"),
    BeforeValidator(_number_as_constant),
]

FieldName = Literal[
    "utilization",
    "memory",
    "temperature",
    "power",
    "power_limit",
    "energy",
    "sm_clock",
    "clock_event_reasons",
    "ecc",
    "remapped_rows",
    "pcie_replay",
    "nvlink",
    "processes",
    "xid_events",
]


class RemappedRows(_Model):
    correctable: int = Field(0, ge=0)
    uncorrectable: int = Field(0, ge=0)
    pending: bool = False
    failure: bool = False


class ProcessSpec(_Model):
    pid: int = Field(gt=0)
    used_memory_bytes: int = Field(ge=0)


class GpuSpec(_Model):
    """One GPU; `gpu_defaults` gives every field, a `gpus` entry only what differs."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str | None = None
    pci_bus_id: str | None = Field(None, pattern=r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")
    memory_total_bytes: int = Field(85_520_809_984, gt=0)
    power_limit_watts: float = Field(700.0, gt=0)
    nvlinks: int = Field(18, ge=0, le=pynvml.NVML_NVLINK_MAX_LINKS)
    utilization: Signal = ConstantSignal(value=0.0)
    memory_utilization: Signal = ConstantSignal(value=0.0)
    memory_used_ratio: Signal = ConstantSignal(value=0.0)
    temperature_celsius: Signal = ConstantSignal(value=35.0)
    power_watts: Signal = ConstantSignal(value=70.0)
    ecc_corrected: int = Field(0, ge=0)
    ecc_uncorrected: int = Field(0, ge=0)
    remapped_rows: RemappedRows = RemappedRows()
    pcie_replay: int = Field(0, ge=0)
    unsupported: tuple[FieldName, ...] = ()
    processes: tuple[ProcessSpec, ...] = ()


class XidSpec(_Model):
    gpu: int = Field(ge=0)
    xid: int = Field(gt=0)
    at_s: float = Field(ge=0)
    repeat: int = Field(1, ge=1, description="How many times (an Xid storm when > 1).")
    every_s: float = Field(1.0, gt=0)


class LostSpec(_Model):
    gpu: int = Field(ge=0)
    at_s: float = Field(ge=0)
    until_s: float | None = Field(None, description="When the GPU answers again (after a reset); never if absent.")
    error: Literal["gpu_is_lost", "unknown", "reset_required", "gpu_not_found"] = "gpu_is_lost"

    @model_validator(mode="after")
    def _until_after_at(self) -> LostSpec:
        if self.until_s is not None and self.until_s <= self.at_s:
            raise ValueError("until_s must be later than at_s")
        return self


class HangSpec(_Model):
    gpu: int = Field(ge=0)
    function: str
    at_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)

    @field_validator("function")
    @classmethod
    def _known_function(cls, value: str) -> str:
        if value not in DEVICE_FUNCTIONS:
            raise ValueError(f"unknown per-GPU NVML function {value!r}; one of: {', '.join(DEVICE_FUNCTIONS)}")
        return value


def _gpus_tag(value: Any) -> str:
    return "list" if isinstance(value, (list, tuple)) else "count"


# Tagged, so a bad entry reports one error at its own path, not one per union member.
GpuList = Annotated[
    Annotated[int, Tag("count")] | Annotated[tuple[GpuSpec, ...], Tag("list")],
    Discriminator(_gpus_tag),
]
_UNION_TAGS = frozenset({"count", "list", "constant", "sine", "ramp"})


class Scenario(_Model):
    """A simulated host: its GPUs and what happens to them when."""

    name: str
    description: str = ""
    driver_version: str = "550.127.05"
    gpu_defaults: GpuSpec = GpuSpec()
    gpus: GpuList = Field(8, description="A count, or one entry per GPU.")
    xids: tuple[XidSpec, ...] = ()
    lost: tuple[LostSpec, ...] = ()
    hangs: tuple[HangSpec, ...] = ()
    control_file: Path | None = Field(None, description="Faults injected while running (module doc).")

    @property
    def gpu_count(self) -> int:
        return self.gpus if isinstance(self.gpus, int) else len(self.gpus)

    def resolved_gpus(self) -> list[GpuSpec]:
        """Every GPU's full spec: defaults, the GPU's own entry, generated uuid and PCI id."""
        entries = [GpuSpec()] * self.gpus if isinstance(self.gpus, int) else list(self.gpus)
        out = []
        for i, entry in enumerate(entries):
            own = {k: getattr(entry, k) for k in entry.model_fields_set}
            spec = self.gpu_defaults.model_copy(update=own)
            out.append(
                spec.model_copy(
                    update={
                        "uuid": spec.uuid
                        if "uuid" in own
                        else f"GPU-{uuidlib.uuid5(_UUID_NAMESPACE, f'{self.name}/{i}')}",
                        "pci_bus_id": spec.pci_bus_id if "pci_bus_id" in own else _default_pci(i),
                    }
                )
            )
        return out


def _default_pci(index: int) -> str:
    bus = _HGX_BUSES[index] if index < len(_HGX_BUSES) else 0x100 - len(_HGX_BUSES) + index % 0x80
    return f"00000000:{bus % 0x100:02X}:00.0"


class ScenarioError(ValueError):
    """A scenario that cannot be used; each line names file, line and field."""


def parse_scenario(text: str, file: str = "<string>") -> Scenario:
    """Validate scenario YAML; every problem is named by file:line:column and field path."""
    try:
        data, positions = load_with_positions(text, file)
    except YamlError as exc:
        raise ScenarioError(str(exc)) from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{file}:1:1: a scenario is a mapping (name, gpus, xids, lost, hangs)")
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            # Drop union tags from the path: the operator wrote `gpus.3`, not `gpus.list.3`.
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)]
            problems.append(
                _located(
                    file,
                    positions,
                    loc,
                    "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, "),
                )
            )
        raise ScenarioError("\n".join(problems)) from None
    problems = [_located(file, positions, loc, msg) for loc, msg in _reference_problems(scenario)]
    if problems:
        raise ScenarioError("\n".join(problems))
    return scenario


def _located(file: str, positions: dict[Any, Any], loc: list[str | int], message: str) -> str:
    pos = position_of(positions, loc)
    where = f"{file}:{pos.line}:{pos.column}" if pos else file
    return f"{where}: {'.'.join(str(p) for p in loc)}: {message}"


def _reference_problems(scenario: Scenario) -> Iterator[tuple[list[str | int], str]]:
    count = scenario.gpu_count
    if not 1 <= count <= _MAX_GPUS:
        yield ["gpus"], f"a host has 1 to {_MAX_GPUS} GPUs, not {count}"
    for section in ("xids", "lost", "hangs"):
        for i, item in enumerate(getattr(scenario, section)):
            if item.gpu >= count:
                yield [section, i, "gpu"], f"GPU {item.gpu} does not exist (the scenario has {count}: 0..{count - 1})"


def list_scenarios() -> list[str]:
    """Names of the scenarios shipped with Sentinel."""
    folder = resources.files(SHIPPED_SCENARIOS_PACKAGE).joinpath("scenarios")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A shipped scenario by name (`gpu-lost`), or a scenario file by path."""
    text_name = str(name_or_path)
    path = Path(name_or_path)
    if isinstance(name_or_path, Path) or path.suffix in (".yaml", ".yml") or "/" in text_name or path.exists():
        try:
            return parse_scenario(path.read_text(encoding="utf-8"), str(path))
        except OSError as exc:
            raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    shipped = resources.files(SHIPPED_SCENARIOS_PACKAGE).joinpath(f"scenarios/{text_name}.yaml")
    if not shipped.is_file():
        raise ScenarioError(f"unknown scenario {text_name!r}: give a file path or one of {', '.join(list_scenarios())}")
    return parse_scenario(shipped.read_text(encoding="utf-8"), f"{text_name}.yaml")


# -- what the simulated functions return -------------------------------------------


@dataclass(frozen=True)
class SimDevice:
    """An opaque device handle, like pynvml's `c_nvmlDevice_t`."""

    index: int


@dataclass
class SimProcessInfo:
    """The shape of an item of `nvmlDeviceGetComputeRunningProcesses`."""

    pid: int
    usedGpuMemory: int | None
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(frozen=True)
class SimEventData:
    """The shape of `nvmlEventSetWait`'s `c_nvmlEventData_t`."""

    device: SimDevice
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(frozen=True)
class _ScheduledXid:
    at_s: float
    gpu: int
    xid: int


class _EventSet:
    def __init__(self, cursor: int) -> None:
        self.devices: set[int] = set()
        self.cursor = cursor  # index of the next scheduled Xid this set has not passed
        self.injected: deque[_ScheduledXid] = deque()
        self.freed = False


def _error(code: int) -> Exception:
    error: Exception = pynvml.NVMLError(code)  # pynvml maps the code to its NVMLError_* subclass
    return error


_LOST_CODES: dict[str, int] = {
    "gpu_is_lost": pynvml.NVML_ERROR_GPU_IS_LOST,
    "unknown": pynvml.NVML_ERROR_UNKNOWN,
    "reset_required": pynvml.NVML_ERROR_RESET_REQUIRED,
    "gpu_not_found": getattr(pynvml, "NVML_ERROR_GPU_NOT_FOUND", pynvml.NVML_ERROR_UNKNOWN),
}
_SM_CLOCK_MHZ, _SM_CLOCK_SLOW_MHZ, _SM_CLOCK_IDLE_MHZ, _MEM_CLOCK_MHZ = 1980, 1410, 345, 2619
_THERMAL_LIMIT_C = 85.0


# -- the simulator ------------------------------------------------------------------


class _SimGpu:
    """One GPU's state; values are computed from its spec at the asked time."""

    def __init__(self, index: int, spec: GpuSpec, scenario: Scenario) -> None:
        self.index = index
        self.spec = spec
        self.handle = SimDevice(index)
        self.unsupported = {f for name in spec.unsupported for f in FIELD_FUNCTIONS[name]}
        self.lost = [lost for lost in scenario.lost if lost.gpu == index]
        self.hangs = [h for h in scenario.hangs if h.gpu == index]
        self.ecc_xid_times = sorted(
            x.at_s + k * x.every_s
            for x in scenario.xids
            if x.gpu == index and x.xid in _ECC_UNCORRECTED_XIDS
            for k in range(x.repeat)
        )
        self._energy_mj = 0.0
        self._energy_t = 0.0
        self._lock = threading.Lock()

    def lost_error(self, t: float) -> int | None:
        for lost in self.lost:
            if lost.at_s <= t and (lost.until_s is None or t < lost.until_s):
                return _LOST_CODES[lost.error]
        return None

    def ratio(self, signal: ConstantSignal | SineSignal | RampSignal, t: float) -> float:
        return min(1.0, max(0.0, signal.at(t)))

    def power_mw(self, t: float) -> int:
        return int(max(0.0, self.spec.power_watts.at(t)) * 1000)

    def energy_mj(self, t: float) -> int:
        with self._lock:
            # Integrate power between reads: monotonic, like the real counter.
            if t > self._energy_t:
                self._energy_mj += self.power_mw((t + self._energy_t) / 2) * (t - self._energy_t)
                self._energy_t = t
            return int(self._energy_mj)

    def clock_reasons(self, t: float) -> int:
        reasons = 0
        if self.ratio(self.spec.utilization, t) < 0.01:
            reasons |= pynvml.nvmlClocksThrottleReasonGpuIdle
        if self.power_mw(t) >= self.spec.power_limit_watts * 1000:
            reasons |= pynvml.nvmlClocksThrottleReasonSwPowerCap
        if self.spec.temperature_celsius.at(t) >= _THERMAL_LIMIT_C:
            reasons |= pynvml.nvmlClocksThrottleReasonSwThermalSlowdown
        return reasons

    def sm_clock_mhz(self, t: float) -> int:
        reasons = self.clock_reasons(t)
        if reasons & (pynvml.nvmlClocksThrottleReasonSwPowerCap | pynvml.nvmlClocksThrottleReasonSwThermalSlowdown):
            return _SM_CLOCK_SLOW_MHZ
        return _SM_CLOCK_IDLE_MHZ if reasons & pynvml.nvmlClocksThrottleReasonGpuIdle else _SM_CLOCK_MHZ

    def ecc_uncorrected(self, t: float) -> int:
        return self.spec.ecc_uncorrected + sum(1 for at in self.ecc_xid_times if at <= t)


class SimulatedNvml:
    """The subset of `pynvml` Sentinel uses, answering from a scenario.

    Thread-safe like NVML. `clock` returns seconds (monotonic); scenario time is
    `clock() - clock()_at_construction`. `calls` counts calls per function.
    """

    def __init__(self, scenario: Scenario, clock: Callable[[], float] = time.monotonic) -> None:
        self.scenario = scenario
        self._clock = clock
        self._t0 = clock()
        self._gpus = [_SimGpu(i, spec, scenario) for i, spec in enumerate(scenario.resolved_gpus())]
        self._schedule = sorted(
            (_ScheduledXid(x.at_s + k * x.every_s, x.gpu, x.xid) for x in scenario.xids for k in range(x.repeat)),
            key=lambda e: e.at_s,
        )
        self._cond = threading.Condition()
        self._sets: list[_EventSet] = []
        self._init_count = 0
        self._released = threading.Event()
        self.calls: Counter[str] = Counter()
        self._control_lock = threading.Lock()
        self._control_checked = -math.inf
        self._control_mtime: int | None = None
        self._control_lost: dict[int, LostSpec] = {}
        self._control_xids = 0

    # -- controls for tests and the demo ------------------------------------------------

    def now(self) -> float:
        """Scenario time in seconds."""
        return self._clock() - self._t0

    def inject_xid(self, gpu: int, xid: int) -> None:
        """Raise an Xid event on `gpu` now (in addition to the scenario's schedule)."""
        self._gpu_at(gpu)
        with self._cond:
            for event_set in self._sets:
                if gpu in event_set.devices and not event_set.freed:
                    event_set.injected.append(_ScheduledXid(self.now(), gpu, xid))
            self._cond.notify_all()

    def lose_gpu(self, gpu: int, error: str = "gpu_is_lost") -> None:
        """Make `gpu` answer every call with a lost-GPU error from now on (the demo's fault)."""
        target = self._gpu_at(gpu)
        target.lost.append(LostSpec(gpu=gpu, at_s=self.now(), error=error))

    def _poll_control(self) -> None:
        """Apply what the scenario's control file asks, when it changed (module doc)."""
        path = self.scenario.control_file
        if path is None:
            return
        now = self._clock()
        with self._control_lock:
            if now - self._control_checked < 0.2:
                return
            self._control_checked = now
            try:
                mtime = path.stat().st_mtime_ns
                if mtime == self._control_mtime:
                    return
                self._control_mtime = mtime
                data = json.loads(path.read_text(encoding="utf-8"))
                lost = {int(g) for g in data.get("lost", [])}
                xids = [(int(g), int(x)) for g, x in data.get("xids", [])]
            except (OSError, ValueError, TypeError, AttributeError):
                return
            for gpu in sorted(lost - set(self._control_lost)):
                if 0 <= gpu < len(self._gpus):
                    spec = LostSpec(gpu=gpu, at_s=self.now())
                    self._control_lost[gpu] = spec
                    self._gpus[gpu].lost.append(spec)
            for gpu in sorted(set(self._control_lost) - lost):
                spec = self._control_lost.pop(gpu)
                lost_list = self._gpus[gpu].lost
                until = max(self.now(), spec.at_s + 1e-6)
                lost_list[lost_list.index(spec)] = spec.model_copy(update={"until_s": until})
            new_xids, self._control_xids = xids[self._control_xids :], max(self._control_xids, len(xids))
        for gpu, xid in new_xids:
            if 0 <= gpu < len(self._gpus) and xid > 0:
                self.inject_xid(gpu, xid)

    def close(self) -> None:
        """End every hang now and for good, so no thread stays blocked after a test."""
        self._released.set()
        with self._cond:
            self._cond.notify_all()

    # -- host ------------------------------------------------------------------------------

    # The methods below carry pynvml's camelCase names and signatures on purpose:
    # the collector calls them exactly as it calls the real module.

    def nvmlInit(self) -> None:
        """Initialise (counted, like NVML: each init needs a shutdown)."""
        self._count_call("nvmlInit")
        with self._cond:
            self._init_count += 1

    def nvmlShutdown(self) -> None:
        """Undo one nvmlInit."""
        self._count_call("nvmlShutdown")
        with self._cond:
            if self._init_count == 0:
                raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
            self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        """The scenario's driver version."""
        self._host_call("nvmlSystemGetDriverVersion")
        return self.scenario.driver_version

    def nvmlDeviceGetCount(self) -> int:
        """Number of GPUs, lost ones included (NVML enumerates at init)."""
        self._host_call("nvmlDeviceGetCount")
        return len(self._gpus)

    # -- identity --------------------------------------------------------------------------

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimDevice:
        """The handle of GPU `index`."""
        self._host_call("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self._gpus):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._enter("nvmlDeviceGetHandleByIndex", self._gpus[index].handle)[0].handle

    def nvmlDeviceGetIndex(self, handle: SimDevice) -> int:
        """The index of a handle."""
        return self._enter("nvmlDeviceGetIndex", handle)[0].index

    def nvmlDeviceGetUUID(self, handle: SimDevice) -> str:
        """`GPU-<uuid>`."""
        gpu, _ = self._enter("nvmlDeviceGetUUID", handle)
        return gpu.spec.uuid or ""

    def nvmlDeviceGetName(self, handle: SimDevice) -> str:
        """The product name."""
        return self._enter("nvmlDeviceGetName", handle)[0].spec.name

    def nvmlDeviceGetPciInfo(self, handle: SimDevice) -> Any:
        """pynvml's `nvmlPciInfo_t` (busId like `00000000:18:00.0`)."""
        gpu, _ = self._enter("nvmlDeviceGetPciInfo", handle)
        bus_id = gpu.spec.pci_bus_id or _default_pci(gpu.index)
        domain, bus, rest = bus_id.split(":")
        info = pynvml.nvmlPciInfo_t()
        info.busId = info.busIdLegacy = bus_id.encode()
        info.domain, info.bus, info.device = int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16)
        info.pciDeviceId = 0x233010DE  # H100 SXM5
        return info

    # -- readings --------------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: SimDevice) -> Any:
        """pynvml's `c_nvmlUtilization_t` (.gpu, .memory in percent)."""
        gpu, t = self._enter("nvmlDeviceGetUtilizationRates", handle)
        return pynvml.c_nvmlUtilization_t(
            gpu=round(gpu.ratio(gpu.spec.utilization, t) * 100),
            memory=round(gpu.ratio(gpu.spec.memory_utilization, t) * 100),
        )

    def nvmlDeviceGetMemoryInfo(self, handle: SimDevice, version: int | None = None) -> Any:
        """pynvml's `c_nvmlMemory_t` (.total, .free, .used in bytes)."""
        gpu, t = self._enter("nvmlDeviceGetMemoryInfo", handle)
        total = gpu.spec.memory_total_bytes
        used = int(total * gpu.ratio(gpu.spec.memory_used_ratio, t))
        return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)

    def nvmlDeviceGetTemperature(self, handle: SimDevice, sensor: int) -> int:
        """Core temperature in degrees Celsius."""
        gpu, t = self._enter("nvmlDeviceGetTemperature", handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return round(gpu.spec.temperature_celsius.at(t))

    def nvmlDeviceGetPowerUsage(self, handle: SimDevice) -> int:
        """Power draw in milliwatts."""
        gpu, t = self._enter("nvmlDeviceGetPowerUsage", handle)
        return gpu.power_mw(t)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: SimDevice) -> int:
        """Power limit in milliwatts."""
        gpu, _ = self._enter("nvmlDeviceGetEnforcedPowerLimit", handle)
        return int(gpu.spec.power_limit_watts * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: SimDevice) -> int:
        """Energy in millijoules since the simulator started."""
        gpu, t = self._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
        return gpu.energy_mj(t)

    def nvmlDeviceGetClockInfo(self, handle: SimDevice, type: int) -> int:
        """SM or memory clock in MHz."""
        gpu, t = self._enter("nvmlDeviceGetClockInfo", handle)
        if type == pynvml.NVML_CLOCK_SM:
            return gpu.sm_clock_mhz(t)
        if type == pynvml.NVML_CLOCK_MEM:
            return _MEM_CLOCK_MHZ
        raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: SimDevice) -> int:
        """Bitmask of clock event reasons (idle, power cap, thermal slowdown)."""
        gpu, t = self._enter("nvmlDeviceGetCurrentClocksEventReasons", handle)
        return gpu.clock_reasons(t)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: SimDevice) -> int:
        """The older name of nvmlDeviceGetCurrentClocksEventReasons."""
        gpu, t = self._enter("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
        return gpu.clock_reasons(t)

    def nvmlDeviceGetTotalEccErrors(self, handle: SimDevice, errorType: int, counterType: int) -> int:
        """ECC error count; uncorrected grows with each scheduled ECC Xid (48, 94, 95, 140)."""
        gpu, t = self._enter("nvmlDeviceGetTotalEccErrors", handle)
        if errorType == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED:
            return gpu.spec.ecc_corrected
        if errorType == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            return gpu.ecc_uncorrected(t)
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetRemappedRows(self, device: SimDevice) -> tuple[int, int, int, int]:
        """(correctable, uncorrectable, pending, failure), as pynvml returns it."""
        gpu, _ = self._enter("nvmlDeviceGetRemappedRows", device)
        rows = gpu.spec.remapped_rows
        return rows.correctable, rows.uncorrectable, int(rows.pending), int(rows.failure)

    def nvmlDeviceGetPcieReplayCounter(self, handle: SimDevice) -> int:
        """PCIe replay count."""
        return self._enter("nvmlDeviceGetPcieReplayCounter", handle)[0].spec.pcie_replay

    def nvmlDeviceGetNvLinkState(self, device: SimDevice, link: int) -> int:
        """NVML_FEATURE_ENABLED for the GPU's links; InvalidArgument past its last link."""
        gpu, _ = self._enter("nvmlDeviceGetNvLinkState", device)
        if gpu.spec.nvlinks == 0:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < gpu.spec.nvlinks:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return int(pynvml.NVML_FEATURE_ENABLED)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: SimDevice) -> list[SimProcessInfo]:
        """The scenario's processes on this GPU (.pid, .usedGpuMemory)."""
        gpu, _ = self._enter("nvmlDeviceGetComputeRunningProcesses", handle)
        return [SimProcessInfo(p.pid, p.used_memory_bytes) for p in gpu.spec.processes]

    # -- events ----------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> Any:
        """A new event set; it hears Xids scheduled after now."""
        self._host_call("nvmlEventSetCreate")
        now = self.now()
        with self._cond:
            cursor = next((i for i, e in enumerate(self._schedule) if e.at_s > now), len(self._schedule))
            event_set = _EventSet(cursor)
            self._sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: SimDevice, eventTypes: int, eventSet: Any) -> None:
        """Listen for Xid events of one GPU on a set."""
        gpu, _ = self._enter("nvmlDeviceRegisterEvents", handle)
        if eventTypes & pynvml.nvmlEventTypeXidCriticalError:
            with self._cond:
                self._event_set(eventSet).devices.add(gpu.index)

    def nvmlEventSetWait(self, eventSet: Any, timeoutms: int) -> SimEventData:
        """The next Xid event of a registered GPU; NVMLError_Timeout after `timeoutms`."""
        self._host_call("nvmlEventSetWait")
        deadline = time.monotonic() + timeoutms / 1000.0
        with self._cond:
            event_set = self._event_set(eventSet)
            while True:
                due = self._next_due(event_set)
                if due is not None:
                    return SimEventData(self._gpus[due.gpu].handle, pynvml.nvmlEventTypeXidCriticalError, due.xid)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _error(pynvml.NVML_ERROR_TIMEOUT)
                self._cond.wait(min(remaining, self._until_next(event_set), _WAIT_SLICE_S * 2))

    def nvmlEventSetFree(self, eventSet: Any) -> None:
        """Release a set."""
        self._host_call("nvmlEventSetFree")
        with self._cond:
            event_set = self._event_set(eventSet)
            event_set.freed = True
            self._sets.remove(event_set)

    def _event_set(self, value: Any) -> _EventSet:
        if not isinstance(value, _EventSet) or value.freed:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return value

    def _next_due(self, event_set: _EventSet) -> _ScheduledXid | None:
        if event_set.injected:
            return event_set.injected.popleft()
        now = self.now()
        while event_set.cursor < len(self._schedule) and self._schedule[event_set.cursor].at_s <= now:
            event = self._schedule[event_set.cursor]
            event_set.cursor += 1
            if event.gpu in event_set.devices:
                return event
        return None

    def _until_next(self, event_set: _EventSet) -> float:
        if event_set.cursor >= len(self._schedule):
            return math.inf
        return max(0.001, self._schedule[event_set.cursor].at_s - self.now())

    # -- the common path of every call -------------------------------------------------------

    def _count_call(self, function: str) -> None:
        self.calls[function] += 1

    def _host_call(self, function: str) -> None:
        self._count_call(function)
        if self._init_count == 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu_at(self, index: int) -> _SimGpu:
        if not 0 <= index < len(self._gpus):
            raise ValueError(f"no GPU {index} in scenario {self.scenario.name!r}")
        return self._gpus[index]

    def _enter(self, function: str, handle: Any) -> tuple[_SimGpu, float]:
        """Checks shared by every per-device call: init, handle, hang, lost, unsupported."""
        self._poll_control()
        if function != "nvmlDeviceGetHandleByIndex":
            self._host_call(function)
        if not isinstance(handle, SimDevice) or not 0 <= handle.index < len(self._gpus):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self._gpus[handle.index]
        self._hang_if_scheduled(gpu, function)
        t = self.now()
        lost = gpu.lost_error(t)
        if lost is not None:
            raise _error(lost)
        if function in gpu.unsupported:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu, t

    def _hang_if_scheduled(self, gpu: _SimGpu, function: str) -> None:
        for hang in gpu.hangs:
            if hang.function != function:
                continue
            end = hang.at_s + hang.duration_s
            if not hang.at_s <= self.now() < end:
                continue
            # Block like a sick driver does, until the hang's end on the scenario clock.
            while not self._released.is_set() and (left := end - self.now()) > 0:
                self._released.wait(min(left, _WAIT_SLICE_S))
