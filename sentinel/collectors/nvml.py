"""The NVML collector: per-GPU health and load, Xid errors as events.

Every NVML call goes through one door (`NvmlDoor`) that turns NVML's error classes
into what the collector needs: an unsupported field is *absent* (logged once, never a
fake zero); a lost GPU (`GpuIsLost`, `Unknown`, `ResetRequired`, `GpuNotFound`) reports
`sentinel_gpu_up=0` while the other GPUs keep reporting.

NVML can block for seconds on a sick driver, so each GPU is polled in its own
single-thread executor, one submit per GPU per pass, and waits at most `call_timeout`
for it. A GPU whose thread is stuck is reported down and skipped (immediately, without
queueing more work behind the stuck call) until the call returns. The event loop never
runs an NVML call.

Xid errors arrive two ways and are counted once: a thread blocked in
`nvmlEventSetWait`, and the kernel log (`NVRM: Xid ...`, see `sentinel.collectors.xid`).
Each is published on the event bus at once, so Xid rules fire in milliseconds.

`nvml=` takes the `pynvml` module or anything with the same functions
(`sentinel.sim.nvml.SimulatedNvml`): the collector cannot tell them apart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pynvml

from sentinel.collectors.base import CollectorUnavailable
from sentinel.collectors.xid import (
    DEFAULT_JOURNAL_ARGV,
    DEFAULT_KMSG_PATH,
    KernelXid,
    XidDeduplicator,
    kernel_xids,
    normalise_pci_bus_id,
)
from sentinel.collectors.xid_policy import XidPolicy
from sentinel.config.models import NvmlCollectorConfig
from sentinel.logs.kernel import KernelLog, KernelSourceSpec
from sentinel.logs.matcher import LogMatcher, Match
from sentinel.logs.patterns import Catalogue
from sentinel.runtime.timeouts import wait_for
from sentinel.state.files import atomic_write
from sentinel.store import Appender, Store, now_ms
from sentinel.store.events import Event, EventBus

__all__ = [
    "GPUS_STATE_FILE",
    "GpuIdentity",
    "GpuLost",
    "GpuReading",
    "NvmlCallError",
    "NvmlCollector",
    "NvmlDoor",
    "THROTTLE_REASONS",
    "declare_nvml_metrics",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

NvmlApi = Any
"""The `pynvml` module, or an object with the same functions and return shapes."""

GPUS_STATE_FILE = "gpus.json"
XID_EVENT_WAIT_MS = 500  # bounds how long close() waits for the Xid thread
# Fields whose NVML call is costly are read at most this often and repeated in between.
# Measured on an H200 (driver 580): nvmlDeviceGetTotalEnergyConsumption ~3.9 ms of CPU,
# nvmlDeviceGetPcieReplayCounter ~0.15 ms, every other call 1-7 us. Read every second on
# 8 GPUs, energy alone would cost 3 % of a core; both are counters, so a 10 s
# resolution loses nothing that rate() over a minute would show.
SLOW_FIELD_PERIOD_S = 10.0
XID_DEDUP_WINDOW_S = 5.0
_INIT_BACKOFF_MAX_S = 30.0
_PASS_MARGIN_S = 0.1  # left of the runner's pass timeout for writing the samples
_XID_LOG_EVERY_S = 60.0


def _nvml_errors(*names: str) -> tuple[type[Exception], ...]:
    # Older nvidia-ml-py releases lack some classes (GpuNotFound); skip what is missing.
    return tuple(getattr(pynvml, f"NVMLError_{n}") for n in names if hasattr(pynvml, f"NVMLError_{n}"))


# The device is gone or unusable until a reset; other GPUs are unaffected. The driver
# errors (unloaded, library/kernel mismatch, NVML shut down) also make it unreadable.
_LOST_ERRORS = _nvml_errors(
    "GpuIsLost", "Unknown", "ResetRequired", "GpuNotFound", "DriverNotLoaded", "LibRmVersionMismatch", "Uninitialized"
)
# The device does not have this field: report it absent, for good.
_UNSUPPORTED_ERRORS = _nvml_errors("NotSupported", "FunctionNotFound")
# Not there right now (e.g. no data yet): absent this pass, asked again next pass.
_NOT_FOUND_ERRORS = _nvml_errors("NotFound", "NoData")
_FUNCTION_NOT_FOUND = _nvml_errors("FunctionNotFound")

# Named bits of nvmlDeviceGetCurrentClocksEventReasons that mean "slowed down".
THROTTLE_REASONS: tuple[tuple[str, int], ...] = (
    ("power", pynvml.nvmlClocksThrottleReasonSwPowerCap),
    ("hw_slowdown", pynvml.nvmlClocksThrottleReasonHwSlowdown),
    ("sync_boost", pynvml.nvmlClocksThrottleReasonSyncBoost),
    ("thermal", pynvml.nvmlClocksThrottleReasonSwThermalSlowdown),
    ("hw_thermal", pynvml.nvmlClocksThrottleReasonHwThermalSlowdown),
    ("hw_power_brake", pynvml.nvmlClocksThrottleReasonHwPowerBrakeSlowdown),
)

_REMAPPED_KINDS = ("correctable", "uncorrectable", "pending", "failure")

_METRICS: tuple[tuple[str, str, str], ...] = (
    ("sentinel_gpu_info", "gauge", "Static facts about a GPU; always 1 (join on gpu)."),
    ("sentinel_gpu_up", "gauge", "1 when the GPU answered NVML this pass; 0 when lost, hung or unreadable."),
    ("sentinel_gpu_utilization_ratio", "gauge", "Fraction of the last sample period a kernel ran on the GPU."),
    (
        "sentinel_gpu_memory_utilization_ratio",
        "gauge",
        "Fraction of the last sample period device memory was read or written.",
    ),
    ("sentinel_gpu_memory_used_bytes", "gauge", "Device memory in use."),
    ("sentinel_gpu_memory_total_bytes", "gauge", "Device memory installed."),
    ("sentinel_gpu_temperature_celsius", "gauge", "GPU core temperature."),
    ("sentinel_gpu_power_watts", "gauge", "Power draw of the GPU board."),
    ("sentinel_gpu_power_limit_watts", "gauge", "Power limit the driver enforces."),
    ("sentinel_gpu_energy_joules_total", "counter", "Energy used by the GPU since the driver loaded."),
    ("sentinel_gpu_sm_clock_hertz", "gauge", "Current SM clock."),
    (
        "sentinel_gpu_clock_event_reasons",
        "gauge",
        "Bitmask of NVML clock event (throttle) reasons; see sentinel_gpu_throttled for named bits.",
    ),
    ("sentinel_gpu_throttled", "gauge", "1 while the GPU's clocks are held down for the named reason."),
    ("sentinel_gpu_ecc_errors_total", "counter", "ECC errors since the driver loaded (volatile counters)."),
    ("sentinel_gpu_remapped_rows", "gauge", "Remapped memory rows by kind; pending and failure are 0/1 flags."),
    ("sentinel_gpu_pcie_replay_total", "counter", "PCIe replays (link retransmissions)."),
    ("sentinel_gpu_nvlink_up", "gauge", "1 when the NVLink link is active."),
    ("sentinel_gpu_process_memory_bytes", "gauge", "Device memory used by a compute process."),
    ("sentinel_gpus_visible", "gauge", "GPUs NVML enumerated."),
    ("sentinel_gpus_expected", "gauge", "GPUs this host should have (config, else the count first seen)."),
    ("sentinel_gpu_xid_errors_total", "counter", "Xid errors reported by NVML events or the kernel log."),
    (
        "sentinel_nvml_call_timeouts_total",
        "counter",
        "Passes in which a GPU's NVML calls did not return within call_timeout (or were still stuck).",
    ),
)


def declare_nvml_metrics(store: Store) -> None:
    """Declare type and help of every metric this collector writes."""
    for name, type_, help_ in _METRICS:
        store.set_meta(name, type_, help_)


# -- the door ----------------------------------------------------------------------


class NvmlCallError(Exception):
    """An NVML call failed; keeps the function's name and pynvml's error."""

    def __init__(self, function: str, error: Exception) -> None:
        super().__init__(f"{error} ({function})")
        self.function = function
        self.error = error


class GpuLost(NvmlCallError):
    """The GPU is gone (fallen off the bus, needs a reset, driver unloaded)."""


class NvmlDoor:
    """The single entry point for the NVML calls of one thread (one GPU, or the host).

    `call` raises `NvmlCallError` (`GpuLost` for lost-GPU errors); `field` returns
    None for a field the device does not have, logging that once per field. The name
    of the call in flight is kept so that a hung call can be named from outside.
    """

    def __init__(self, nvml: NvmlApi, owner: str) -> None:
        self._nvml = nvml
        self.owner = owner
        self._functions: dict[str, Callable[..., Any] | None] = {}
        self._unsupported: set[str] = set()
        self._missing: set[str] = set()
        self._logged: set[tuple[str, str]] = set()
        self.in_flight: str | None = None
        self.in_flight_since = 0.0

    def call(self, function: str, *args: Any) -> Any:
        """Call an NVML function by name; errors become `NvmlCallError` / `GpuLost`."""
        fn = self._resolve(function)
        if fn is None:
            raise NvmlCallError(function, pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND))
        self.in_flight_since = time.monotonic()
        self.in_flight = function
        try:
            return fn(*args)
        except _LOST_ERRORS as exc:
            raise GpuLost(function, exc) from None
        except pynvml.NVMLError as exc:
            raise NvmlCallError(function, exc) from None
        finally:
            self.in_flight = None

    def field(self, name: str, function: str, *args: Any) -> Any | None:
        """The value of one field, or None when the device does not report it."""
        if name in self._unsupported:
            return None
        try:
            return self.call(function, *args)
        except GpuLost:
            raise
        except NvmlCallError as exc:
            self.note_absent(name, exc)
            return None

    def first_field(self, name: str, functions: Sequence[str], *args: Any) -> Any | None:
        """Like `field`, trying newer then older names of one NVML function."""
        if name in self._unsupported:
            return None
        for function in functions:
            if function in self._missing or self._resolve(function) is None:
                continue
            try:
                return self.call(function, *args)
            except GpuLost:
                raise
            except NvmlCallError as exc:
                if isinstance(exc.error, _FUNCTION_NOT_FOUND):
                    self._missing.add(function)  # the driver predates this name: try the older one
                    continue
                self.note_absent(name, exc)
                return None
        self.note_absent(name, NvmlCallError(functions[-1], pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)))
        return None

    def note_absent(self, name: str, exc: NvmlCallError) -> None:
        """Remember and log (once) that a field is absent on this device."""
        if isinstance(exc.error, _UNSUPPORTED_ERRORS):
            self._unsupported.add(name)
            self._log_once(
                name, "unsupported", logging.INFO, "%s: %s not supported (%s); reported absent", self.owner, name, exc
            )
        elif isinstance(exc.error, _NOT_FOUND_ERRORS):
            self._log_once(name, "not-found", logging.DEBUG, "%s: %s not available yet (%s)", self.owner, name, exc)
        else:
            self._log_once(
                name,
                type(exc.error).__name__,
                logging.WARNING,
                "%s: reading %s failed (%s); reported absent",
                self.owner,
                name,
                exc,
            )

    def _log_once(self, name: str, kind: str, level: int, msg: str, *args: object) -> None:
        if (name, kind) not in self._logged:
            self._logged.add((name, kind))
            log.log(level, msg, *args)

    def _resolve(self, function: str) -> Callable[..., Any] | None:
        try:
            return self._functions[function]
        except KeyError:
            fn = getattr(self._nvml, function, None)
            self._functions[function] = fn
            return fn


# -- executors ---------------------------------------------------------------------


class _SerialExecutor:
    """One daemon thread running submitted calls in order.

    Not `ThreadPoolExecutor`: its threads are joined at interpreter exit, so one NVML
    call hung in the driver would keep Sentinel from ever exiting.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue `fn`; the future completes when the thread has run it."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if not self._started:
            self._started = True
            self._thread.start()
        self._queue.put((fn, future))
        return future

    def shutdown(self) -> None:
        """Let the thread end after its current call; does not wait."""
        if self._started:
            self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the awaiting side, not lost
                future.set_exception(exc)


async def _bounded(future: concurrent.futures.Future[T], timeout: float) -> T:
    """Await a thread's call for at most `timeout` seconds; the call itself runs on."""
    wrapped = asyncio.wrap_future(future)
    try:
        # shield: a timeout must not try to cancel the call the thread is running.
        return await wait_for(asyncio.shield(wrapped), timeout)
    except asyncio.TimeoutError:
        # Whatever the late call ends with has no reader any more: consume it quietly.
        wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


# -- one GPU -----------------------------------------------------------------------


@dataclass(frozen=True)
class GpuIdentity:
    """What a GPU is; kept across passes so a lost GPU keeps its uuid label."""

    index: int
    uuid: str = ""
    name: str = ""
    pci_bus_id: str = ""


@dataclass
class GpuReading:
    """One pass over one GPU; None means "absent" (unsupported or unreadable)."""

    identity: GpuIdentity
    up: bool
    problem: str | None = None
    utilization: float | None = None
    memory_utilization: float | None = None
    memory_used: float | None = None
    memory_total: float | None = None
    temperature: float | None = None
    power: float | None = None
    power_limit: float | None = None
    energy: float | None = None
    sm_clock: float | None = None
    clock_event_reasons: int | None = None
    ecc: dict[str, float] = field(default_factory=dict)
    remapped_rows: dict[str, float] = field(default_factory=dict)
    pcie_replay: float | None = None
    nvlink: dict[int, bool] = field(default_factory=dict)
    processes: list[tuple[int, float]] = field(default_factory=list)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _scaled(value: Any, scale: float) -> float | None:
    return None if value is None else float(value) * scale


class _GpuPoller:
    """Reads one GPU; `poll` runs on this GPU's own thread, everything else on the loop."""

    def __init__(self, index: int, nvml: NvmlApi) -> None:
        self.index = index
        self.door = NvmlDoor(nvml, f"GPU {index}")
        self.executor = _SerialExecutor(f"sentinel-nvml-gpu{index}")
        self.identity = GpuIdentity(index)
        self._handle: Any = None
        self._nvlinks = 0
        self._slow_cache: dict[str, tuple[float, float | None]] = {}
        # Loop-side state:
        self.stuck: concurrent.futures.Future[GpuReading] | None = None
        self.stuck_call: str | None = None
        self.stuck_since = 0.0
        self.timeouts_total = 0
        self.last_problem: str | None = None
        self.last_reading: GpuReading | None = None

    def poll(self) -> GpuReading:
        """All NVML calls of one pass over this GPU; never raises."""
        try:
            handle = self._handle if self._handle is not None else self._acquire()
            return self._read(handle)
        except NvmlCallError as exc:
            # Lost, or the handle itself is unreadable: ask for a fresh one next pass.
            self._handle = None
            return GpuReading(self.identity, up=False, problem=str(exc))

    def _acquire(self) -> Any:
        door = self.door
        handle = door.call("nvmlDeviceGetHandleByIndex", self.index)
        pci = door.field("pci_bus_id", "nvmlDeviceGetPciInfo", handle)
        self.identity = GpuIdentity(
            self.index,
            uuid=_text(door.field("uuid", "nvmlDeviceGetUUID", handle)) or self.identity.uuid,
            name=_text(door.field("name", "nvmlDeviceGetName", handle)) or self.identity.name,
            pci_bus_id=normalise_pci_bus_id(_text(pci.busId)) if pci is not None else self.identity.pci_bus_id,
        )
        self._nvlinks = self._count_nvlinks(handle)
        self._slow_cache.clear()  # a new handle (after a loss or reset) is read afresh
        self._handle = handle
        return handle

    def _count_nvlinks(self, handle: Any) -> int:
        # Links past the device's count answer InvalidArgument; probing once per handle
        # keeps the per-pass cost to the links that exist.
        max_links = int(pynvml.NVML_NVLINK_MAX_LINKS)
        for link in range(max_links):
            try:
                self.door.call("nvmlDeviceGetNvLinkState", handle, link)
            except GpuLost:
                raise
            except NvmlCallError as exc:
                if link == 0:
                    self.door.note_absent("nvlink", exc)
                return link
        return max_links

    def _read(self, h: Any) -> GpuReading:
        door = self.door
        r = GpuReading(self.identity, up=True)
        util = door.field("utilization", "nvmlDeviceGetUtilizationRates", h)
        if util is not None:
            r.utilization, r.memory_utilization = util.gpu / 100.0, util.memory / 100.0
        mem = door.field("memory", "nvmlDeviceGetMemoryInfo", h)
        if mem is not None:
            r.memory_used, r.memory_total = float(mem.used), float(mem.total)
        r.temperature = _scaled(
            door.field("temperature", "nvmlDeviceGetTemperature", h, pynvml.NVML_TEMPERATURE_GPU), 1.0
        )
        r.power = _scaled(door.field("power", "nvmlDeviceGetPowerUsage", h), 1e-3)  # mW
        r.power_limit = _scaled(door.field("power_limit", "nvmlDeviceGetEnforcedPowerLimit", h), 1e-3)
        energy_mj = partial(door.field, "energy", "nvmlDeviceGetTotalEnergyConsumption", h)
        r.energy = self._slow("energy", energy_mj, 1e-3)
        r.sm_clock = _scaled(door.field("sm_clock", "nvmlDeviceGetClockInfo", h, pynvml.NVML_CLOCK_SM), 1e6)  # MHz
        reasons = door.first_field(
            "clock_event_reasons",
            ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"),
            h,
        )
        r.clock_event_reasons = None if reasons is None else int(reasons)
        self._read_errors(h, r)
        self._read_links_and_processes(h, r)
        return r

    def _read_errors(self, h: Any, r: GpuReading) -> None:
        door = self.door
        for kind, code in (
            ("corrected", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
            ("uncorrected", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
        ):
            # Volatile (since driver load) like dcgm-exporter: a reset is a counter reset.
            count = door.field("ecc", "nvmlDeviceGetTotalEccErrors", h, code, pynvml.NVML_VOLATILE_ECC)
            if count is not None:
                r.ecc[kind] = float(count)
        rows = door.field("remapped_rows", "nvmlDeviceGetRemappedRows", h)
        if rows is not None:
            r.remapped_rows = {kind: float(v) for kind, v in zip(_REMAPPED_KINDS, rows, strict=False)}
        replays = partial(door.field, "pcie_replay", "nvmlDeviceGetPcieReplayCounter", h)
        r.pcie_replay = self._slow("pcie_replay", replays)

    def _slow(self, name: str, read: Callable[[], Any], scale: float = 1.0) -> float | None:
        """A costly field: read at most every SLOW_FIELD_PERIOD_S, the last value in between."""
        now = time.monotonic()
        cached = self._slow_cache.get(name)
        if cached is not None and now - cached[0] < SLOW_FIELD_PERIOD_S:
            return cached[1]
        value = _scaled(read(), scale)
        self._slow_cache[name] = (now, value)
        return value

    def _read_links_and_processes(self, h: Any, r: GpuReading) -> None:
        door = self.door
        for link in range(self._nvlinks):
            state = door.field("nvlink", "nvmlDeviceGetNvLinkState", h, link)
            if state is not None:
                r.nvlink[link] = state == pynvml.NVML_FEATURE_ENABLED
        procs = door.field("processes", "nvmlDeviceGetComputeRunningProcesses", h)
        for p in procs or ():
            if p.usedGpuMemory is not None:  # None: the driver cannot tell (WDDM, no permission)
                r.processes.append((int(p.pid), float(p.usedGpuMemory)))


# -- Xid events from NVML ------------------------------------------------------------


def _pointer_value(handle: Any) -> int | None:
    try:
        value: int | None = ctypes.cast(handle, ctypes.c_void_p).value
        return value
    except (TypeError, ctypes.ArgumentError):
        return None


class _XidEventThread:
    """Waits in `nvmlEventSetWait` for Xid events and hands each to `on_xid(index, xid)`."""

    def __init__(self, nvml: NvmlApi, gpu_count: int, on_xid: Callable[[int | None, int], None]) -> None:
        self._nvml = nvml
        self._count = gpu_count
        self._on_xid = on_xid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sentinel-nvml-xid", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to end; it checks between waits of XID_EVENT_WAIT_MS."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("NVML Xid event thread did not stop within %.1fs (nvmlEventSetWait hung?)", timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        door = NvmlDoor(self._nvml, "Xid events")
        try:
            event_set = door.call("nvmlEventSetCreate")
        except NvmlCallError as exc:
            log.warning("NVML Xid events unavailable (%s); Xids come from the kernel log only", exc)
            return
        try:
            handles = self._register(door, event_set)
            if handles:
                self._wait_loop(door, event_set, handles)
            else:
                log.warning("no GPU accepted Xid event registration; Xids come from the kernel log only")
        finally:
            with contextlib.suppress(NvmlCallError):  # NVML may be shut down already
                door.call("nvmlEventSetFree", event_set)

    def _register(self, door: NvmlDoor, event_set: Any) -> dict[int, Any]:
        handles: dict[int, Any] = {}
        for index in range(self._count):
            try:
                handle = door.call("nvmlDeviceGetHandleByIndex", index)
                door.call("nvmlDeviceRegisterEvents", handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
            except NvmlCallError as exc:
                log.info("GPU %d: Xid events not available (%s)", index, exc)
                continue
            handles[index] = handle
        return handles

    def _wait_loop(self, door: NvmlDoor, event_set: Any, handles: Mapping[int, Any]) -> None:
        warned = False
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                data = door.call("nvmlEventSetWait", event_set, XID_EVENT_WAIT_MS)
            except NvmlCallError as exc:
                if isinstance(exc.error, pynvml.NVMLError_Timeout):
                    self._pace(started)  # no event: check for stop, wait again
                    continue
                if not warned:
                    log.warning("waiting for NVML Xid events failed (%s); retrying", exc)
                    warned = True
                self._stop.wait(1.0)  # a persistent error must not spin
                continue
            if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                self._on_xid(self._index_of(door, data.device, handles), int(data.eventData))
            else:
                self._pace(started)

    def _pace(self, started: float) -> None:
        # Some drivers answer a wait at once (an early Timeout, another event type) over and
        # over: without this the thread would spin a core. Real Xids are never delayed.
        left = XID_EVENT_WAIT_MS / 1000.0 - (time.monotonic() - started)
        if left > 0.05:
            self._stop.wait(left)

    @staticmethod
    def _index_of(door: NvmlDoor, device: Any, handles: Mapping[int, Any]) -> int | None:
        try:
            return int(door.call("nvmlDeviceGetIndex", device))
        except NvmlCallError:
            pass  # a GPU that just fell off the bus may not answer: match the handle instead
        wanted = _pointer_value(device)
        for index, handle in handles.items():
            if handle is device or (wanted is not None and _pointer_value(handle) == wanted):
                return index
        return None


# -- the collector -----------------------------------------------------------------


def _init_failure_reason(exc: BaseException) -> str:
    error = exc.error if isinstance(exc, NvmlCallError) else exc
    if isinstance(error, _nvml_errors("LibraryNotFound")):
        return "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this host?"
    if isinstance(error, _nvml_errors("DriverNotLoaded")):
        return "NVIDIA driver not loaded (nvmlInit: Driver Not Loaded): is the nvidia kernel module loaded?"
    if isinstance(error, _nvml_errors("LibRmVersionMismatch")):
        return "NVML library and kernel driver versions differ: reload the nvidia module or reboot after an upgrade"
    if isinstance(error, _nvml_errors("NoPermission")):
        return "no permission to open the NVIDIA devices (nvmlInit: Insufficient Permissions)"
    if isinstance(exc, NvmlCallError):
        return f"NVML initialisation failed: {exc}"
    return f"NVML initialisation failed: {type(exc).__name__}: {exc}"


@dataclass
class _XidLogState:
    last_logged: float
    suppressed: int = 0


class NvmlCollector:
    """Per-GPU metrics from NVML, and Xid errors from NVML events and the kernel log."""

    name = "nvml"

    def __init__(
        self,
        config: NvmlCollectorConfig,
        store: Store,
        bus: EventBus,
        state_dir: Path,
        expected_gpus: int | None = None,
        pid_owner: Callable[[], Mapping[int, str]] = dict,
        nvml: NvmlApi = pynvml,
        *,
        kmsg_path: Path = DEFAULT_KMSG_PATH,
        journal_argv: Sequence[str] = DEFAULT_JOURNAL_ARGV,
        kernel_log: KernelLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = config.interval
        self.timeout_s = config.timeout
        self._config = config
        self._store = store
        self._bus = bus
        self._state_dir = Path(state_dir)
        self._expected: int | None = expected_gpus
        self._pid_owner = pid_owner
        self._nvml = nvml
        self._clock = clock
        self._policy = XidPolicy({})  # the real one is read in start(), off the event loop
        self._dedup = XidDeduplicator(XID_DEDUP_WINDOW_S, clock)
        self._xid_lock = threading.Lock()
        # Every Xid counter seen, re-written on each pass: a counter that only got a
        # sample when it moved would fall out of the lookback and hide the next Xid.
        self._xid_counts: dict[tuple[tuple[str, str], ...], float] = {}
        self._xid_log: dict[tuple[str, int], _XidLogState] = {}
        self._host = _SerialExecutor("sentinel-nvml-host")
        self._host_door = NvmlDoor(nvml, "NVML")
        self._host_stuck: concurrent.futures.Future[Any] | None = None
        self._initialised = False
        self._init_failures = 0
        self._next_init_at = 0.0
        self._reason: str | None = None
        self._driver_version = ""
        self._visible = 0
        self._pollers: list[_GpuPoller] = []
        # Replaced whole (never mutated) so the Xid threads read a consistent map.
        self._identities: dict[int, GpuIdentity] = {}
        self._by_pci: dict[str, GpuIdentity] = {}
        self._owner_failed = False
        self._xid_thread: _XidEventThread | None = None
        # The host's one kernel-log reader (shared with the log collector when the daemon
        # builds both); this collector takes its Xids and counts them once against NVML's.
        self._kernel = kernel_log or KernelLog(
            KernelSourceSpec(path=kmsg_path, argv=tuple(journal_argv), mode=config.kernel_log),
            LogMatcher(Catalogue.load()),
        )
        self._kernel.subscribe(self._on_kernel_matches, owns_xids=True)
        declare_nvml_metrics(store)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Read the Xid policy and the persisted GPU count; start the kernel log reader."""
        self._bus.bind_loop(asyncio.get_running_loop())
        self._policy = await asyncio.to_thread(XidPolicy.load, self._config.xid_overrides)
        if self._expected is None:
            self._expected = await asyncio.to_thread(self._load_expected)
        self._kernel.start()

    async def close(self) -> None:
        """Stop the Xid threads (within 1 s), release the GPU threads, shut NVML down."""
        self._kernel.unsubscribe(self._on_kernel_matches)
        stops = [asyncio.to_thread(self._kernel.stop, 1.0)]
        if self._xid_thread is not None:
            stops.append(asyncio.to_thread(self._xid_thread.stop, 1.0))
        await asyncio.gather(*stops)
        any_stuck = any(p.stuck is not None and not p.stuck.done() for p in self._pollers)
        for poller in self._pollers:
            poller.executor.shutdown()
        if self._initialised and not any_stuck and self._host_stuck is None:
            try:
                await _bounded(
                    self._host.submit(lambda: self._host_door.call("nvmlShutdown")), self._config.call_timeout
                )
            except (asyncio.TimeoutError, NvmlCallError) as exc:
                log.debug("nvmlShutdown: %s", exc)
        self._initialised = False
        self._host.shutdown()

    # -- one pass ----------------------------------------------------------------------

    async def collect(self, out: Appender) -> None:
        """One pass: every GPU in parallel, each bounded by call_timeout."""
        await self._ensure_initialised()
        readings = await self._poll_all()
        owners = self._owners()
        for reading in readings:
            self._emit(out, reading, owners)
        out.add("sentinel_gpus_visible", self._visible)
        with self._xid_lock:
            xid_counts = list(self._xid_counts.items())
        for labels, count in xid_counts:
            out.add("sentinel_gpu_xid_errors_total", count, dict(labels))
        if self._expected is not None:
            out.add("sentinel_gpus_expected", self._expected)
        self._update_identities(readings)
        self._reason = self._degraded_reason()

    @property
    def reason(self) -> str | None:
        """Why the collector is not fully reporting (no driver, a lost or hung GPU), or None."""
        return self._reason

    def gpus_snapshot(self) -> list[dict[str, Any]]:
        """The latest reading of every GPU, for the /api/v1/gpus endpoint and reports."""
        return [self._snapshot(p) for p in self._pollers]

    # -- initialisation ------------------------------------------------------------------

    async def _ensure_initialised(self) -> None:
        if self._initialised:
            return
        if self._host_stuck is not None and not self._host_stuck.done():
            raise CollectorUnavailable(self._reason or "nvmlInit has not returned")
        if self._clock() < self._next_init_at:
            # Cheap retry: between attempts a pass costs nothing but this check.
            raise CollectorUnavailable(self._reason or "NVML not initialised")
        self._host_stuck = None
        future = self._host.submit(self._init_host)
        try:
            count, driver = await _bounded(future, self._config.call_timeout)
        except asyncio.TimeoutError:
            self._host_stuck = future
            reason = f"nvmlInit did not return within {self._config.call_timeout:g}s: is the driver hung?"
            raise self._init_failed(reason) from None
        except Exception as exc:
            raise self._init_failed(_init_failure_reason(exc)) from None
        else:
            await self._initialised_with(count, driver)

    def _init_host(self) -> tuple[int, str]:
        door = self._host_door
        door.call("nvmlInit")
        try:
            count = int(door.call("nvmlDeviceGetCount"))
        except NvmlCallError:
            door.call("nvmlShutdown")  # keep NVML's init count balanced for the retry
            raise
        return count, _text(door.field("driver_version", "nvmlSystemGetDriverVersion"))

    def _init_failed(self, reason: str) -> CollectorUnavailable:
        # Back off (interval, 2x, 4x ... 30 s): a host without a driver stays without one.
        self._init_failures += 1
        backoff = min(_INIT_BACKOFF_MAX_S, self.interval_s * 2 ** (self._init_failures - 1))
        self._next_init_at = self._clock() + backoff
        self._reason = reason
        return CollectorUnavailable(reason)

    async def _initialised_with(self, count: int, driver: str) -> None:
        if self._init_failures:
            log.info("NVML available after %d failed attempts", self._init_failures)
        self._initialised, self._init_failures, self._reason = True, 0, None
        self._visible, self._driver_version = count, driver
        if len(self._pollers) != count:
            self._pollers = [_GpuPoller(i, self._nvml) for i in range(count)]
        log.info("NVML: %d GPUs, driver %s", count, driver or "unknown")
        if self._expected is None and count > 0:
            self._expected = count
            await asyncio.to_thread(self._save_expected, count)
        if self._config.xid_events and self._xid_thread is None and count > 0:
            self._xid_thread = _XidEventThread(self._nvml, count, self._on_nvml_xid)
            self._xid_thread.start()

    # -- polling -------------------------------------------------------------------------

    async def _poll_all(self) -> list[GpuReading]:
        """Every GPU once: one after another, each on its own thread, each bounded.

        In turn rather than all at once: concurrent NVML calls contend inside the driver
        (measured on an H200: 8 threads polling one device at once cost up to 10x the CPU of
        the same calls in turn). Once a GPU hangs, the rest of the pass is asked at once,
        so a sick driver costs one call_timeout per pass, not one per GPU.
        """
        readings: dict[int, GpuReading] = {}
        todo: list[_GpuPoller] = []
        for poller in self._pollers:
            if poller.stuck is not None:
                if not poller.stuck.done():
                    readings[poller.index] = self._hung(poller, skipped=True)
                    continue
                self._hang_ended(poller)
            todo.append(poller)
        deadline = time.monotonic() + max(self.timeout_s - _PASS_MARGIN_S, self._config.call_timeout)
        for i, poller in enumerate(todo):
            readings.update(await self._poll_together([poller], deadline))
            if poller.stuck is not None:
                readings.update(await self._poll_together(todo[i + 1 :], deadline))
                break
        return [readings[p.index] for p in self._pollers]

    async def _poll_together(self, pollers: Sequence[_GpuPoller], deadline: float) -> dict[int, GpuReading]:
        """Poll `pollers` concurrently, waiting at most call_timeout (and never past `deadline`)."""
        readings: dict[int, GpuReading] = {}
        waiting: dict[asyncio.Future[GpuReading], tuple[_GpuPoller, concurrent.futures.Future[GpuReading]]] = {}
        for poller in pollers:
            future = poller.executor.submit(poller.poll)
            waiting[asyncio.wrap_future(future)] = (poller, future)
        if not waiting:
            return readings
        timeout = max(0.01, min(self._config.call_timeout, deadline - time.monotonic()))
        done: set[asyncio.Future[GpuReading]] = set()
        try:
            done, _ = await asyncio.wait(waiting, timeout=timeout)
        finally:
            # Also on cancellation: whatever did not finish is stuck in its thread.
            for wrapped, (poller, future) in waiting.items():
                if wrapped in done:
                    readings[poller.index] = wrapped.result()
                else:
                    poller.stuck = future
                    readings[poller.index] = self._hung(poller, skipped=False)
        return readings

    def _hung(self, poller: _GpuPoller, *, skipped: bool) -> GpuReading:
        poller.timeouts_total += 1
        if not skipped:
            poller.stuck_call = poller.door.in_flight
            poller.stuck_since = poller.door.in_flight_since if poller.stuck_call else time.monotonic()
            log.warning(
                "GPU %d: NVML call %s did not return within %gs; GPU reported down and skipped until it does",
                poller.index,
                poller.stuck_call or "(unknown)",
                self._config.call_timeout,
            )
        call = poller.stuck_call or "an NVML call"
        return GpuReading(poller.identity, up=False, problem=f"{call} hung")

    def _hang_ended(self, poller: _GpuPoller) -> None:
        log.info(
            "GPU %d: %s returned after %.1fs; polling again",
            poller.index,
            poller.stuck_call or "the hung NVML call",
            time.monotonic() - poller.stuck_since,
        )
        poller.stuck, poller.stuck_call = None, None

    def _owners(self) -> Mapping[int, str]:
        try:
            return self._pid_owner()
        except Exception:
            if not self._owner_failed:
                self._owner_failed = True
                log.exception("pid_owner failed; process series carry no worker label")
            return {}

    # -- writing samples ---------------------------------------------------------------

    def _emit(self, out: Appender, r: GpuReading, owners: Mapping[int, str]) -> None:
        ident = r.identity
        gpu = {"gpu": str(ident.index), "uuid": ident.uuid}
        poller = self._pollers[ident.index]
        self._log_state_change(poller, r)
        poller.last_reading = r
        out.add("sentinel_nvml_call_timeouts_total", poller.timeouts_total, gpu=str(ident.index))
        if ident.uuid:
            # `name` is also Appender.add's own parameter: pass the label in the mapping.
            info = {**gpu, "pci_bus_id": ident.pci_bus_id, "name": ident.name, "driver_version": self._driver_version}
            out.add("sentinel_gpu_info", 1, info)
        out.add("sentinel_gpu_up", 1 if r.up else 0, gpu)
        if not r.up:
            return  # its other series go stale: a lost GPU has no temperature, not 0 degrees
        for name, value in (
            ("sentinel_gpu_utilization_ratio", r.utilization),
            ("sentinel_gpu_memory_utilization_ratio", r.memory_utilization),
            ("sentinel_gpu_memory_used_bytes", r.memory_used),
            ("sentinel_gpu_memory_total_bytes", r.memory_total),
            ("sentinel_gpu_temperature_celsius", r.temperature),
            ("sentinel_gpu_power_watts", r.power),
            ("sentinel_gpu_power_limit_watts", r.power_limit),
            ("sentinel_gpu_energy_joules_total", r.energy),
            ("sentinel_gpu_sm_clock_hertz", r.sm_clock),
            ("sentinel_gpu_pcie_replay_total", r.pcie_replay),
        ):
            if value is not None:
                out.add(name, value, gpu)
        self._emit_flags(out, r, gpu)
        for pid, used in r.processes:
            out.add("sentinel_gpu_process_memory_bytes", used, gpu, pid=str(pid), worker=owners.get(pid, ""))

    @staticmethod
    def _emit_flags(out: Appender, r: GpuReading, gpu: Mapping[str, str]) -> None:
        if r.clock_event_reasons is not None:
            out.add("sentinel_gpu_clock_event_reasons", r.clock_event_reasons, gpu)
            for reason, bit in THROTTLE_REASONS:
                out.add("sentinel_gpu_throttled", 1 if r.clock_event_reasons & bit else 0, gpu, reason=reason)
        for kind, count in r.ecc.items():
            out.add("sentinel_gpu_ecc_errors_total", count, gpu, type=kind)
        for kind, rows in r.remapped_rows.items():
            out.add("sentinel_gpu_remapped_rows", rows, gpu, kind=kind)
        for link, up in r.nvlink.items():
            out.add("sentinel_gpu_nvlink_up", 1 if up else 0, gpu, link=str(link))

    @staticmethod
    def _log_state_change(poller: _GpuPoller, r: GpuReading) -> None:
        # Log on up/down changes only: a GPU that stays lost must not log every second,
        # even when the failing call (and so the problem text) differs between passes.
        was_down = poller.last_problem is not None
        poller.last_problem = r.problem
        if r.up == (not was_down):
            return
        ident = r.identity
        if r.up:
            log.info("GPU %d (%s) is reporting again", ident.index, ident.uuid or "uuid unknown")
        elif poller.stuck is None:  # a hang was logged when it began
            log.warning("GPU %d (%s) is down: %s", ident.index, ident.uuid or "uuid unknown", r.problem)

    def _update_identities(self, readings: Sequence[GpuReading]) -> None:
        identities = {r.identity.index: r.identity for r in readings}
        if identities != self._identities:
            self._identities = identities
            self._by_pci = {i.pci_bus_id: i for i in identities.values() if i.pci_bus_id}

    def _degraded_reason(self) -> str | None:
        problems = [f"GPU {p.index}: {p.last_problem}" for p in self._pollers if p.last_problem]
        return "; ".join(problems) or None

    def _snapshot(self, poller: _GpuPoller) -> dict[str, Any]:
        r = poller.last_reading or GpuReading(poller.identity, up=False, problem="not polled yet")
        owners = self._owners() if r.processes else {}
        return {
            "index": r.identity.index,
            "uuid": r.identity.uuid,
            "pci_bus_id": r.identity.pci_bus_id,
            "name": r.identity.name,
            "up": r.up,
            "problem": r.problem,
            "utilization": r.utilization,
            "memory_utilization": r.memory_utilization,
            "memory_used_bytes": r.memory_used,
            "memory_total_bytes": r.memory_total,
            "temperature_celsius": r.temperature,
            "power_watts": r.power,
            "power_limit_watts": r.power_limit,
            "processes": [
                {"pid": pid, "memory_bytes": used, "worker": owners.get(pid) or None} for pid, used in r.processes
            ],
        }

    # -- Xids (called on the Xid threads) ------------------------------------------------

    def _on_nvml_xid(self, index: int | None, xid: int) -> None:
        ident = self._identities.get(index) if index is not None else None
        self._record_xid(xid, "nvml", ident or (GpuIdentity(index) if index is not None else None), "")

    def _on_kernel_matches(self, matches: list[Match], _ts: int) -> None:
        for hit in kernel_xids(matches):
            try:
                self._on_kernel_xid(hit)
            except Exception:  # one Xid's failure must not lose the others of the block
                log.exception("kernel log: handling Xid %d failed", hit.xid)

    def _on_kernel_xid(self, hit: KernelXid) -> None:
        ident = self._by_pci.get(hit.pci_bus_id)
        self._record_xid(hit.xid, "kernel", ident, hit.pci_bus_id)

    def _record_xid(self, xid: int, source: str, ident: GpuIdentity | None, pci_bus_id: str) -> None:
        gpu = str(ident.index) if ident is not None else ""
        pci_bus_id = (ident.pci_bus_id if ident is not None else "") or pci_bus_id
        info = self._policy.classify(xid)
        counter = {
            "gpu": gpu,
            "uuid": ident.uuid if ident is not None else "",
            "xid": str(xid),
            "class": info.xid_class,
        }
        with self._xid_lock:
            if not self._dedup.admit((pci_bus_id or f"gpu{gpu}", xid), source):
                return
            self._count_xid(counter)
        labels = {k: v for k, v in {**counter, "pci_bus_id": pci_bus_id, "action": info.action}.items() if v}
        self._bus.publish_threadsafe(
            Event(
                kind="xid",
                source=source,
                labels=labels,
                value=float(xid),
                message=info.description,
                metrics=("sentinel_gpu_xid_errors_total",),
            )
        )
        self._log_xid(gpu or pci_bus_id or "?", xid, info.xid_class, info.description, source)

    def _count_xid(self, labels: Mapping[str, str]) -> None:
        name = "sentinel_gpu_xid_errors_total"
        now = now_ms()  # Sentinel's clock, as every other sample: it never steps back
        key = tuple(sorted(labels.items()))
        if key not in self._xid_counts:
            # A new counter starts at 0 just before its first increment, so increase()
            # and rate() see the first Xid instead of a series that begins at 1.
            self._store.add(name, 0.0, labels, now - 1)
        self._xid_counts[key] = self._xid_counts.get(key, 0.0) + 1
        self._store.add(name, self._xid_counts[key], labels, now)

    def _log_xid(self, gpu: str, xid: int, xid_class: str, description: str, source: str) -> None:
        # A storm of one Xid logs once a minute with a count, not once per event.
        now = time.monotonic()
        state = self._xid_log.get((gpu, xid))
        if state is not None and now - state.last_logged < _XID_LOG_EVERY_S:
            state.suppressed += 1
            return
        more = f" ({state.suppressed} more since the last log)" if state and state.suppressed else ""
        self._xid_log[(gpu, xid)] = _XidLogState(now)
        level = logging.INFO if xid_class in ("application", "informational") else logging.WARNING
        log.log(level, "Xid %d on GPU %s (%s, from %s): %s%s", xid, gpu, xid_class, source, description, more)

    # -- persisted GPU count -------------------------------------------------------------

    def _load_expected(self) -> int | None:
        path = self._state_dir / GPUS_STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return None
        value = data.get("expected") if isinstance(data, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            log.warning("ignoring %s: no non-negative integer 'expected'", path)
            return None
        return value

    def _save_expected(self, count: int) -> None:
        path = self._state_dir / GPUS_STATE_FILE
        try:
            data = json.dumps({"expected": count, "first_seen": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
            # Atomic and fsynced: a crash or power cut must not leave half a file (or none).
            atomic_write(path, data.encode(), 0o644)
            log.info("expecting %d GPUs from now on (first count seen, saved in %s)", count, path)
        except OSError as exc:
            log.warning("cannot save the GPU count to %s: %s", path, exc)
