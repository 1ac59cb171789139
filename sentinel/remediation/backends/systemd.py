"""The systemd backend: start, stop and restart a unit over D-Bus, profile in its EnvironmentFile=.

Verbs are `Manager.StartUnit` / `StopUnit` / `RestartUnit` with mode `replace`, as
`systemctl` sends them. Each returns a job; the verb returns when that job's
`JobRemoved` signal arrives: result `done` is success, any other result (`failed`,
`timeout`, `canceled`, `dependency`, `skipped`, ...) is a `BackendError` naming it. The
whole verb is bounded by `job_timeout`; a job still running then is left to systemd
(as `systemctl` leaves it) and reported as a `BackendError`.

The active profile is written atomically to the unit's `EnvironmentFile=` before a start
or restart, because systemd reads that file only when it starts the service. The file
is written by Sentinel itself, so it must live in a directory Sentinel may write (e.g.
`/etc/sentinel/workers/`); a non-root Sentinel needs a polkit rule granting
`org.freedesktop.systemd1.manage-units` for the unit (see `systemd/` in the repository).

Signals are matched before the method call is sent and collected while a verb is in
flight: a short job can finish, and its `JobRemoved` be read, in the same read as the
method's reply, before the caller knows its job path.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Literal

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from sentinel.remediation.backend import ActionContext, BackendError, UnitState
from sentinel.remediation.backends.envfile import read_profile_name, write_profile
from sentinel.remediation.settings import Profile, SystemdBackendConfig
from sentinel.runtime.threads import WorkerThreads
from sentinel.runtime.timeouts import wait_for

__all__ = ["MANAGER_INTERFACE", "MANAGER_PATH", "SYSTEMD_BUS_NAME", "UNIT_INTERFACE", "SystemdBackend"]

log = logging.getLogger(__name__)

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_INTERFACE = "org.freedesktop.systemd1.Manager"
UNIT_INTERFACE = "org.freedesktop.systemd1.Unit"
_PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
_NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
_ALREADY_SUBSCRIBED = "org.freedesktop.systemd1.AlreadySubscribed"
_DENIED = ("org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired")
_JOB_REMOVED_RULE = (
    f"type='signal',sender='{SYSTEMD_BUS_NAME}',path='{MANAGER_PATH}',"
    f"interface='{MANAGER_INTERFACE}',member='JobRemoved'"
)
_STATE_TIMEOUT_S = 10.0  # reading a unit's state is a few round trips; more means the bus is stuck


class SystemdBackend:
    """Carries out verbs on one systemd unit over D-Bus; see the module doc."""

    def __init__(
        self,
        worker: str,
        unit: str,
        env_file: Path,
        *,
        bus: Literal["system", "session"] = "system",
        bus_address: str | None = None,
        job_timeout: float = 120.0,
    ) -> None:
        self.worker = worker
        self.unit = unit
        self.env_file = env_file
        self._bus_type = BusType.SYSTEM if bus == "system" else BusType.SESSION
        self._bus_address = bus_address
        self._job_timeout = job_timeout
        # Its own threads for the env file: never behind a hung query in the default executor.
        self._threads = WorkerThreads(f"backend-{worker}", 1)
        self._bus: MessageBus | None = None
        self._disconnected: asyncio.Future[Any] | None = None
        # One verb at a time: the env file and the restart that reads it belong together.
        self._lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()  # a verb and state() may both find no connection
        self._finished: dict[str, str] = {}  # job path -> result, while a verb is in flight
        self._waiters: dict[str, asyncio.Future[str]] = {}

    @classmethod
    def from_config(cls, worker: str, cfg: SystemdBackendConfig) -> SystemdBackend:
        """A backend for `worker` as `sentinel.yaml` describes it."""
        return cls(
            worker,
            cfg.unit,
            Path(cfg.env_file),
            bus=cfg.bus,
            bus_address=cfg.bus_address,
            job_timeout=cfg.job_timeout,
        )

    async def start(self, profile: Profile, ctx: ActionContext) -> None:
        """Write `profile` to the env file, then start the unit (a running unit keeps its profile)."""
        async with self._lock:
            await self._write_profile(profile)
            await self._run_job("StartUnit")

    async def stop(self, ctx: ActionContext) -> None:
        """Stop the unit and wait for the job."""
        async with self._lock:
            await self._run_job("StopUnit")

    async def restart(self, profile: Profile, ctx: ActionContext) -> None:
        """Write `profile` to the env file atomically, then restart the unit and wait for the job."""
        async with self._lock:
            await self._write_profile(profile)
            await self._run_job("RestartUnit")

    async def state(self) -> UnitState:
        """The unit's ActiveState (detail: SubState); `unknown` when systemd cannot be asked."""
        try:
            return await wait_for(self._read_state(), min(_STATE_TIMEOUT_S, self._job_timeout))
        except asyncio.TimeoutError:
            return UnitState("unknown", f"{self.unit}: no answer from systemd within {_STATE_TIMEOUT_S:g}s")
        except BackendError as exc:
            return UnitState("unknown", str(exc))

    async def active_profile(self) -> str | None:
        """The profile named in the unit's env file; None when the file says none."""
        try:
            return await self._threads.run(read_profile_name, self.env_file)
        except OSError as exc:
            log.warning("worker %s: cannot read %s: %s", self.worker, self.env_file, exc)
            return None

    async def close(self) -> None:
        """Drop the bus connection; the unit keeps running."""
        bus, self._bus = self._bus, None
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()
        if self._disconnected is not None:
            self._disconnected.cancel()
            self._disconnected = None
        if bus is not None:
            bus.disconnect()

    async def _write_profile(self, profile: Profile) -> None:
        try:
            await self._threads.run(write_profile, self.env_file, profile)
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot write profile {profile.name!r} to {self.env_file}: {exc}") from exc

    async def _run_job(self, method: str) -> None:
        try:
            result = await wait_for(self._job(method), self._job_timeout)
        except asyncio.TimeoutError:
            raise BackendError(f"{method} {self.unit}: the job did not finish within {self._job_timeout:g}s") from None
        if result != "done":
            raise BackendError(f"{method} {self.unit}: job result {result!r}")
        log.info("worker %s: %s %s done", self.worker, method, self.unit)

    async def _job(self, method: str) -> str:
        bus = await self._connect()
        disconnected = self._disconnected
        if disconnected is None:
            raise BackendError(f"{method} {self.unit}: the backend was closed")
        self._finished.clear()
        reply = await self._call(bus, MANAGER_PATH, MANAGER_INTERFACE, method, "ss", [self.unit, "replace"])
        job = str(reply.body[0])
        if job in self._finished:
            return self._finished.pop(job)
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[job] = waiter
        try:
            await asyncio.wait({waiter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                raise BackendError(f"{method} {self.unit}: lost the D-Bus connection while waiting for job {job}")
            return waiter.result()
        finally:
            self._waiters.pop(job, None)
            self._finished.clear()

    async def _read_state(self) -> UnitState:
        bus = await self._connect()
        try:
            reply = await self._call(bus, MANAGER_PATH, MANAGER_INTERFACE, "GetUnit", "s", [self.unit])
        except _CallError as exc:
            if exc.name != _NO_SUCH_UNIT:
                raise
            # Not loaded (systemd unloads inactive units): LoadUnit finds a unit file that exists.
            reply = await self._call(bus, MANAGER_PATH, MANAGER_INTERFACE, "LoadUnit", "s", [self.unit])
        path = str(reply.body[0])
        values: dict[str, str] = {}
        for prop in ("LoadState", "ActiveState", "SubState"):
            got = await self._call(bus, path, _PROPERTIES_INTERFACE, "Get", "ss", [UNIT_INTERFACE, prop])
            variant = got.body[0]
            values[prop] = str(variant.value if isinstance(variant, Variant) else variant)
        if values["LoadState"] != "loaded":
            return UnitState("unknown", f"{self.unit}: LoadState={values['LoadState']}")
        return UnitState(values["ActiveState"], values["SubState"])

    async def _connect(self) -> MessageBus:
        async with self._connect_lock:
            if self._bus is not None and self._bus.connected:
                return self._bus
            return await self._open()

    async def _open(self) -> MessageBus:
        await self.close()
        where = self._bus_address or ("the system bus" if self._bus_type is BusType.SYSTEM else "the session bus")
        try:
            bus = await MessageBus(bus_address=self._bus_address, bus_type=self._bus_type).connect()
        except Exception as exc:  # dbus-fast raises OSError, AuthError, EOFError, ... for an unusable bus
            raise BackendError(f"cannot connect to {where}: {exc}") from exc
        bus.add_message_handler(self._on_message)
        # dbus-fast leaves wait_for_disconnect unannotated (5.2); it returns None when the bus closes.
        disconnected = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        # Its outcome is only a wake-up for waiters; retrieve it so asyncio never logs it.
        disconnected.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._bus, self._disconnected = bus, disconnected
        try:
            await self._call(
                bus,
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "AddMatch",
                "s",
                [_JOB_REMOVED_RULE],
                destination="org.freedesktop.DBus",
            )
            try:
                # systemd sends JobRemoved only while some client is subscribed.
                await self._call(bus, MANAGER_PATH, MANAGER_INTERFACE, "Subscribe", "", [])
            except _CallError as exc:
                if exc.name != _ALREADY_SUBSCRIBED:
                    raise
        except BaseException:
            await self.close()
            raise
        return bus

    def _on_message(self, msg: Message) -> None:
        if (
            msg.message_type is not MessageType.SIGNAL
            or msg.member != "JobRemoved"
            or msg.interface != MANAGER_INTERFACE
            or msg.path != MANAGER_PATH
            or not self._lock.locked()  # no verb in flight: nobody waits for any job
        ):
            return
        try:
            _job_id, job, _unit, result = msg.body
        except ValueError:
            return
        waiter = self._waiters.get(job)
        if waiter is not None and not waiter.done():
            waiter.set_result(str(result))
        else:
            self._finished[str(job)] = str(result)

    async def _call(
        self,
        bus: MessageBus,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: list[Any],
        *,
        destination: str = SYSTEMD_BUS_NAME,
    ) -> Message:
        msg = Message(
            destination=destination, path=path, interface=interface, member=member, signature=signature, body=body
        )
        try:
            reply = await bus.call(msg)
        except Exception as exc:  # a connection lost mid-call surfaces as whatever the transport raised
            raise BackendError(f"{member} {self.unit}: D-Bus call failed: {exc}") from exc
        if reply.message_type is MessageType.ERROR:
            text = str(reply.body[0]) if reply.body else ""
            raise _CallError(member, self.unit, reply.error_name or "", text)
        return reply


class _CallError(BackendError):
    """systemd (or the bus) answered a call with a D-Bus error."""

    def __init__(self, member: str, unit: str, name: str, text: str) -> None:
        hint = ""
        if name in _DENIED:
            hint = " (a non-root Sentinel needs a polkit rule for org.freedesktop.systemd1.manage-units)"
        super().__init__(f"{member} {unit}: {name}: {text}{hint}")
        self.name = name
