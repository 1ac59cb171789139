"""The systemd backend against a real private D-Bus bus and a stand-in org.freedesktop.systemd1.

A `dbus-daemon` runs per test on a socket in a fresh directory; the stand-in manager is
a dbus-fast `ServiceInterface` on its own connection in the test process, so every call
the backend makes crosses the real bus (marshalling, match rules, signal routing).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated

import pytest
from dbus_fast import DBusError, PropertyAccess
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusObjectPath, DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from sentinel.remediation.backend import ActionContext, BackendError, ProfileRecord, UnitState, WorkerBackend
from sentinel.remediation.backends import SystemdBackend, build_backend
from sentinel.remediation.backends.envfile import read_env_file
from sentinel.remediation.settings import Profile
from tests.conftest import require_tool

UNIT = "vllm@qwen3.service"
CTX = ActionContext(worker="qwen", action="reduce_batch", alertname="WorkerOOM")
FULL = Profile(name="full", env={"MAX_NUM_SEQS": "64"})
REDUCED = Profile(name="reduced", env={"MAX_NUM_SEQS": "16"})

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def unit_path(name: str) -> str:
    """systemd's object path for a unit: bytes other than [A-Za-z0-9] escaped as _XX."""
    return "/org/freedesktop/systemd1/unit/" + "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in name)


class FakeUnit(ServiceInterface):
    """org.freedesktop.systemd1.Unit properties (member names are D-Bus's CamelCase)."""

    def __init__(self, active: str = "inactive", sub: str = "dead", load: str = "loaded") -> None:
        super().__init__("org.freedesktop.systemd1.Unit")
        self.active, self.sub, self.load = active, sub, load

    @dbus_property(access=PropertyAccess.READ)
    def ActiveState(self) -> DBusStr:
        return self.active

    @dbus_property(access=PropertyAccess.READ)
    def SubState(self) -> DBusStr:
        return self.sub

    @dbus_property(access=PropertyAccess.READ)
    def LoadState(self) -> DBusStr:
        return self.load


class FakeManager(ServiceInterface):
    """org.freedesktop.systemd1.Manager, as far as the backend uses it; records every call."""

    def __init__(self, bus: MessageBus, env_file: Path) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.bus = bus
        self.env_file = env_file
        self.calls: list[tuple[str, ...]] = []  # every call, in order
        self.env_at_call: list[dict[str, str] | None] = []  # env file content when each job was asked for
        self.results: dict[str, str | None] = {}  # verb -> job result; None: the job never finishes
        self.delay = 0.2
        self.remove_before_reply = False  # JobRemoved on the wire before the method's reply
        self.noise = False  # another client's job finishes first
        self.deny: set[str] = set()
        self.units: dict[str, FakeUnit] = {}
        self.loaded: set[str] = set()
        self._next_job = 100

    def add_unit(self, name: str, unit: FakeUnit, *, loaded: bool = True) -> None:
        self.units[name] = unit
        self.bus.export(unit_path(name), unit)
        if loaded:
            self.loaded.add(name)

    def _job(self, verb: str, name: str, mode: str) -> str:
        self.calls.append((verb, name, mode))
        self.env_at_call.append(read_env_file(self.env_file))
        if verb in self.deny:
            raise DBusError("org.freedesktop.DBus.Error.AccessDenied", "Access denied")
        self._next_job += 1
        job_id = self._next_job
        job = f"/org/freedesktop/systemd1/job/{job_id}"
        result = self.results.get(verb, "done")
        if result is not None:
            if self.remove_before_reply:
                self._finish(verb, job_id, job, name, result)
            else:
                asyncio.get_running_loop().call_later(self.delay, self._finish, verb, job_id, job, name, result)
        if self.noise:
            self.JobRemoved(1, "/org/freedesktop/systemd1/job/1", "other.service", "failed")
        return job

    def _finish(self, verb: str, job_id: int, job: str, name: str, result: str) -> None:
        unit = self.units.get(name)
        if unit is not None:
            if result != "done":
                unit.active, unit.sub = "failed", "failed"
            elif verb == "StopUnit":
                unit.active, unit.sub = "inactive", "dead"
            else:
                unit.active, unit.sub = "active", "running"
        self.JobRemoved(job_id, job, name, result)

    @dbus_method()
    def StartUnit(self, name: DBusStr, mode: DBusStr) -> DBusObjectPath:
        return self._job("StartUnit", name, mode)

    @dbus_method()
    def StopUnit(self, name: DBusStr, mode: DBusStr) -> DBusObjectPath:
        return self._job("StopUnit", name, mode)

    @dbus_method()
    def RestartUnit(self, name: DBusStr, mode: DBusStr) -> DBusObjectPath:
        return self._job("RestartUnit", name, mode)

    @dbus_method()
    def GetUnit(self, name: DBusStr) -> DBusObjectPath:
        self.calls.append(("GetUnit", name))
        if name not in self.loaded:
            raise DBusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
        return unit_path(name)

    @dbus_method()
    def LoadUnit(self, name: DBusStr) -> DBusObjectPath:
        self.calls.append(("LoadUnit", name))
        if name not in self.units:
            self.add_unit(name, FakeUnit(load="not-found"))
        self.loaded.add(name)
        return unit_path(name)

    @dbus_method()
    def Subscribe(self):  # type: ignore[no-untyped-def]  # dbus-fast would read `-> None` as a signature
        self.calls.append(("Subscribe",))

    @dbus_signal()
    def JobRemoved(
        self, job_id: int, job: str, unit: str, result: str
    ) -> Annotated[tuple[int, str, str, str], DBusSignature("uoss")]:
        return (job_id, job, unit, result)

    def verbs(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] in ("StartUnit", "StopUnit", "RestartUnit")]


class PrivateBus:
    """A dbus-daemon of the test's own, listening on a socket in a fresh directory."""

    def __init__(self) -> None:
        daemon = require_tool("dbus-daemon", "dbus")
        # A short directory of our own: socket paths are limited to 108 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="sentinel-dbus-", dir="/tmp"))
        config = self.directory / "bus.conf"
        config.write_text(BUS_CONFIG.format(dir=self.directory))
        self.proc = subprocess.Popen(
            [daemon, f"--config-file={config}", "--print-address", "--nofork", "--nopidfile"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], 10.0)[0]:
            self.close()
            pytest.fail("dbus-daemon printed no address within 10s")
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("unix:"), self.address

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def private_bus() -> Iterator[PrivateBus]:
    bus = PrivateBus()
    yield bus
    bus.close()


@pytest.fixture
def bus_address(private_bus: PrivateBus) -> str:
    return private_bus.address


@pytest.fixture
async def systemd(bus_address: str, tmp_path: Path) -> AsyncIterator[FakeManager]:
    """The stand-in systemd, owning org.freedesktop.systemd1 on the private bus."""
    bus = await MessageBus(bus_address=bus_address).connect()
    manager = FakeManager(bus, tmp_path / "workers" / "qwen.env")
    bus.export("/org/freedesktop/systemd1", manager)
    await bus.request_name("org.freedesktop.systemd1")
    manager.add_unit(UNIT, FakeUnit("active", "running"))
    yield manager
    bus.disconnect()
    # A bus that died under a test ends its wait with EOFError: take it, or asyncio logs it at exit.
    with contextlib.suppress(Exception):
        await bus.wait_for_disconnect()


@pytest.fixture
async def backend(systemd: FakeManager, bus_address: str) -> AsyncIterator[SystemdBackend]:
    b = SystemdBackend("qwen", UNIT, systemd.env_file, bus="session", bus_address=bus_address, job_timeout=10.0)
    yield b
    await b.close()


def test_systemd_backend_is_a_worker_backend_that_records_its_profile(tmp_path: Path) -> None:
    b = SystemdBackend("qwen", UNIT, tmp_path / "qwen.env")
    assert isinstance(b, WorkerBackend)
    assert isinstance(b, ProfileRecord)


@pytest.mark.wallclock
async def test_restart_writes_the_env_file_before_restart_unit_and_waits_for_the_job(
    systemd: FakeManager, backend: SystemdBackend
) -> None:
    systemd.delay = 0.3
    started = time.monotonic()
    await backend.restart(REDUCED, CTX)
    assert time.monotonic() - started >= 0.25  # returned on JobRemoved, not on the method's reply
    assert systemd.verbs() == [("RestartUnit", UNIT, "replace")]
    assert systemd.env_at_call == [{"MAX_NUM_SEQS": "16", "SENTINEL_PROFILE": "reduced"}]
    assert ("Subscribe",) in systemd.calls
    assert await backend.active_profile() == "reduced"


async def test_start_and_stop_send_their_jobs_with_replace_mode(systemd: FakeManager, backend: SystemdBackend) -> None:
    await backend.stop(CTX)
    assert await backend.state() == UnitState("inactive", "dead")
    await backend.start(FULL, CTX)
    assert await backend.state() == UnitState("active", "running")
    assert systemd.verbs() == [("StopUnit", UNIT, "replace"), ("StartUnit", UNIT, "replace")]
    assert systemd.env_at_call == [None, {"MAX_NUM_SEQS": "64", "SENTINEL_PROFILE": "full"}]


@pytest.mark.parametrize("result", ["failed", "timeout", "canceled", "dependency"])
async def test_a_job_that_does_not_end_done_is_a_backend_error_naming_its_result(
    systemd: FakeManager, backend: SystemdBackend, result: str
) -> None:
    systemd.results["RestartUnit"] = result
    with pytest.raises(BackendError, match=f"RestartUnit {UNIT}: job result '{result}'"):
        await backend.restart(FULL, CTX)


@pytest.mark.wallclock
async def test_a_job_that_never_finishes_times_out(systemd: FakeManager, bus_address: str) -> None:
    systemd.results["RestartUnit"] = None
    b = SystemdBackend("qwen", UNIT, systemd.env_file, bus="session", bus_address=bus_address, job_timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"did not finish within 0\.5s"):
            await b.restart(FULL, CTX)
        assert 0.45 <= time.monotonic() - started < 5.0
        # The connection is still usable for the next verb.
        systemd.results["RestartUnit"] = "done"
        await b.restart(FULL, CTX)
    finally:
        await b.close()


async def test_job_removed_before_the_method_reply_is_not_missed(systemd: FakeManager, backend: SystemdBackend) -> None:
    systemd.remove_before_reply = True
    await asyncio.wait_for(backend.restart(FULL, CTX), 5.0)
    systemd.results["StopUnit"] = "failed"
    with pytest.raises(BackendError, match="job result 'failed'"):
        await asyncio.wait_for(backend.stop(CTX), 5.0)


async def test_another_jobs_removal_does_not_end_the_wait(systemd: FakeManager, backend: SystemdBackend) -> None:
    systemd.noise = True  # an unrelated job fails first
    await backend.restart(FULL, CTX)


async def test_state_loads_a_unit_that_is_not_loaded(systemd: FakeManager, backend: SystemdBackend) -> None:
    systemd.add_unit("idle.service", FakeUnit("inactive", "dead"), loaded=False)
    b = SystemdBackend("idle", "idle.service", systemd.env_file, bus="session", bus_address=backend._bus_address)
    try:
        assert await b.state() == UnitState("inactive", "dead")
    finally:
        await b.close()
    assert [c for c in systemd.calls if c[0] in ("GetUnit", "LoadUnit")] == [
        ("GetUnit", "idle.service"),
        ("LoadUnit", "idle.service"),
    ]


async def test_state_of_a_missing_unit_file_is_unknown(systemd: FakeManager, bus_address: str) -> None:
    b = SystemdBackend("x", "missing.service", systemd.env_file, bus="session", bus_address=bus_address)
    try:
        assert await b.state() == UnitState("unknown", "missing.service: LoadState=not-found")
    finally:
        await b.close()


async def test_denied_verb_is_a_backend_error_that_points_at_polkit(
    systemd: FakeManager, backend: SystemdBackend
) -> None:
    systemd.deny.add("RestartUnit")
    with pytest.raises(BackendError, match=r"AccessDenied.*polkit"):
        await backend.restart(FULL, CTX)


async def test_state_is_unknown_when_systemd_is_not_on_the_bus(bus_address: str, tmp_path: Path) -> None:
    b = SystemdBackend("qwen", UNIT, tmp_path / "e.env", bus="session", bus_address=bus_address, job_timeout=5.0)
    try:
        state = await b.state()
        assert state.state == "unknown"
        assert "org.freedesktop.DBus.Error.ServiceUnknown" in state.detail
        with pytest.raises(BackendError, match="ServiceUnknown"):
            await b.stop(CTX)
    finally:
        await b.close()


async def test_unreachable_bus_is_a_backend_error(tmp_path: Path) -> None:
    b = SystemdBackend("qwen", UNIT, tmp_path / "e.env", bus_address=f"unix:path={tmp_path}/nobus", job_timeout=5.0)
    with pytest.raises(BackendError, match="cannot connect"):
        await b.stop(CTX)
    assert (await b.state()).state == "unknown"
    await b.close()


async def test_unwritable_env_file_fails_before_any_restart(
    systemd: FakeManager, bus_address: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    b = SystemdBackend("qwen", UNIT, blocker / "qwen.env", bus="session", bus_address=bus_address)
    try:
        with pytest.raises(BackendError, match="cannot write profile 'full'"):
            await b.restart(FULL, CTX)
    finally:
        await b.close()
    assert systemd.verbs() == []


async def test_profile_is_read_back_by_a_restarted_sentinel(systemd: FakeManager, backend: SystemdBackend) -> None:
    await backend.restart(REDUCED, CTX)
    await backend.close()
    again = SystemdBackend("qwen", UNIT, systemd.env_file)
    assert await again.active_profile() == "reduced"


async def test_reconnects_after_the_connection_was_closed(systemd: FakeManager, backend: SystemdBackend) -> None:
    await backend.restart(FULL, CTX)
    await backend.close()
    await backend.restart(REDUCED, CTX)
    assert len(systemd.verbs()) == 2


async def test_losing_the_bus_while_waiting_is_a_backend_error_not_a_hang(
    private_bus: PrivateBus, systemd: FakeManager, backend: SystemdBackend
) -> None:
    systemd.results["RestartUnit"] = None
    verb = asyncio.create_task(backend.restart(FULL, CTX))
    await eventually_called(systemd, "RestartUnit")
    private_bus.proc.terminate()  # the system bus restarting under us
    with pytest.raises(BackendError, match="lost the D-Bus connection"):
        await asyncio.wait_for(verb, 5.0)  # well before job_timeout (10s)


async def eventually_called(systemd: FakeManager, verb: str) -> None:
    for _ in range(500):
        if any(c[0] == verb for c in systemd.calls):
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{verb} was never called")


def test_build_backend_wires_the_configured_systemd_unit(tmp_path: Path) -> None:
    from sentinel.config.models import WorkerConfig

    worker = WorkerConfig.model_validate(
        {
            "name": "qwen",
            "backend": {"type": "systemd", "unit": UNIT, "env_file": str(tmp_path / "q.env"), "job_timeout": "30s"},
            "profiles": [{"name": "full"}],
        }
    )
    b = build_backend(worker, tmp_path)
    assert isinstance(b, SystemdBackend)
    assert (b.unit, b.env_file, b._job_timeout) == (UNIT, tmp_path / "q.env", 30.0)
    assert read_env_file(tmp_path / "q.env") is None  # building touches nothing
