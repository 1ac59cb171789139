"""The process backend: Sentinel runs the worker as a supervised child (demo, hosts without systemd).

The child is started from the configured argv, never through a shell, with
os.environ + the backend's `env` + the profile's `env` + `SENTINEL_PROFILE` and
`SENTINEL_WORKER`. It runs in its own session (so its own process group): a stop
reaches every process it spawned (vLLM's engine and GPU workers), and a Ctrl-C meant
for Sentinel does not reach it. Its stdout and stderr are appended straight to a log
file (default `<state_dir>/workers/<name>.log`) that the log collector can follow;
a file, not a pipe, so the child never blocks on Sentinel and outlives it cleanly.

Stop sends SIGTERM to the group and SIGKILL to whatever is left after `stop_timeout`.
When the child exits by itself the exit code is recorded and `state()` reports it
(`failed`, or `inactive` for status 0); the backend never restarts it: the policy
decides, within its budget.

Next to the log the backend keeps `<name>.env` (the active profile, written atomically
in the `EnvironmentFile=` format, read back by `active_profile()`) and `<name>.pid`
(`PID STARTTIME`; usable as the worker's `process.pid_file`). With `stop_on_exit=False`
the child outlives Sentinel, and the next Sentinel adopts it through the pid file: it
reports it `active`, stops it by its group, and does not start a second copy. The exit
code of an adopted child cannot be known (it is no longer our child). Under systemd
this also needs `KillMode=process` (or `mixed`) in Sentinel's own unit: by default,
stopping Sentinel's service kills its whole cgroup, the child included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sentinel.remediation.backend import ActionContext, BackendError, UnitState
from sentinel.remediation.backends.children import (
    child_environ,
    describe_exit,
    process_identity,
    signal_group,
    wait_group,
)
from sentinel.remediation.backends.envfile import PROFILE_KEY, read_profile_name, write_profile
from sentinel.remediation.settings import ProcessBackendConfig, Profile
from sentinel.runtime.threads import WorkerThreads
from sentinel.runtime.timeouts import wait_for
from sentinel.state.files import atomic_write

__all__ = ["ProcessBackend", "worker_files"]

log = logging.getLogger(__name__)

_KILL_WAIT_S = 5.0  # after SIGKILL; longer only for a process stuck in the kernel (D state)


def worker_files(state_dir: Path, worker: str) -> tuple[Path, Path, Path]:
    """The default (log, env, pid) files of `worker` under `state_dir`/workers."""
    base = state_dir / "workers"
    return base / f"{worker}.log", base / f"{worker}.env", base / f"{worker}.pid"


class ProcessBackend:
    """Supervises one worker process; see the module doc."""

    def __init__(
        self,
        worker: str,
        argv: Sequence[str],
        *,
        state_dir: Path,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        log_file: Path | None = None,
        stop_timeout: float = 10.0,
        stop_on_exit: bool = True,
        proc_root: Path = Path("/proc"),
    ) -> None:
        if not argv:
            raise ValueError("argv must name a command")
        default_log, self.env_file, self.pid_file = worker_files(state_dir, worker)
        self.worker = worker
        self.argv = tuple(argv)
        self.cwd = cwd
        self.env = dict(env or {})
        self.log_file = log_file or default_log
        self.stop_timeout = stop_timeout
        self.stop_on_exit = stop_on_exit
        self._proc_root = proc_root
        # Its own threads for pid and env files: never behind a hung query in the default executor.
        self._threads = WorkerThreads(f"backend-{worker}", 2)
        self._lock = asyncio.Lock()
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[int] | None = None
        self._profile: str | None = None  # profile of the running (or last) child
        self._stopping = False  # the current child's exit was asked for
        self._killed = False  # ... and needed SIGKILL
        self._exit: int | None = None

    @classmethod
    def from_config(
        cls, worker: str, cfg: ProcessBackendConfig, state_dir: Path, *, stop_on_exit: bool = True
    ) -> ProcessBackend:
        """A backend for `worker` as `sentinel.yaml` describes it."""
        return cls(
            worker,
            cfg.argv,
            state_dir=state_dir,
            cwd=cfg.cwd,
            env=cfg.env,
            log_file=Path(cfg.log_file) if cfg.log_file else None,
            stop_timeout=cfg.stop_timeout,
            stop_on_exit=stop_on_exit,
        )

    @property
    def pid(self) -> int | None:
        """Pid of the running child; None when none runs."""
        if self._proc is not None and self._proc.returncode is None:
            return self._proc.pid
        return None

    @property
    def last_exit(self) -> int | None:
        """Return code of the last child that exited (negative: killed by that signal)."""
        return self._exit

    async def start(self, profile: Profile, ctx: ActionContext) -> None:
        """Start the worker with `profile`; a worker that already runs is left as it is."""
        async with self._lock:
            if self.pid is not None or await self._adopted() is not None:
                log.info("worker %s: start requested but it is already running", self.worker)
                return
            await self._spawn(profile)

    async def stop(self, ctx: ActionContext) -> None:
        """SIGTERM to the worker's process group, SIGKILL after `stop_timeout`."""
        async with self._lock:
            await self._stop()

    async def restart(self, profile: Profile, ctx: ActionContext) -> None:
        """Stop the worker, then start it with `profile`."""
        async with self._lock:
            await self._stop()
            await self._spawn(profile)

    async def state(self) -> UnitState:
        """`active` while the child runs; after an exit `failed` (non-zero) or `inactive`."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            return UnitState("active", f"pid {proc.pid}, profile {self._profile}")
        if proc is None:
            adopted = await self._adopted()
            if adopted is not None:
                return UnitState("active", f"pid {adopted}, adopted from an earlier Sentinel")
            return UnitState("inactive", "not started")
        code = proc.returncode
        assert code is not None
        if self._stopping:
            return UnitState("inactive", "stopped with SIGKILL after stop_timeout" if self._killed else "stopped")
        return UnitState("inactive" if code == 0 else "failed", describe_exit(code))

    async def active_profile(self) -> str | None:
        """The profile of the running (or last) child, else the one in `<name>.env`; None if never."""
        if self._profile is not None:
            return self._profile
        return await self._threads.run(read_profile_name, self.env_file)

    async def close(self) -> None:
        """Stop the worker when `stop_on_exit`; otherwise leave it running for the next Sentinel."""
        async with self._lock:
            if self.stop_on_exit:
                try:
                    await self._stop()
                except BackendError as exc:
                    # Sentinel is shutting down: say what is left behind, do not fail the shutdown.
                    log.error("%s", exc)
            elif self._watch is not None:
                # The pid file stays: it is how the next Sentinel finds the child.
                self._watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watch

    async def _spawn(self, profile: Profile) -> None:
        env = child_environ(self.env, profile.env, {PROFILE_KEY: profile.name, "SENTINEL_WORKER": self.worker})
        try:
            await self._threads.run(write_profile, self.env_file, profile)
            fd = await self._threads.run(self._open_log)
        except (OSError, ValueError) as exc:
            raise BackendError(f"worker {self.worker}: cannot prepare profile {profile.name!r}: {exc}") from exc
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendError(f"worker {self.worker}: cannot run {self.argv[0]!r}: {exc}") from exc
        finally:
            os.close(fd)  # the child has its own copy
        self._proc, self._profile = proc, profile.name
        self._stopping = self._killed = False
        self._watch = asyncio.create_task(self._watch_exit(proc), name=f"worker-{self.worker}-exit")
        started = await self._threads.run(process_identity, proc.pid, self._proc_root)
        record = f"{proc.pid} {started[1]}\n" if started else f"{proc.pid}\n"
        try:
            await self._threads.run(atomic_write, self.pid_file, record.encode(), 0o644)
        except OSError as exc:
            log.warning("worker %s: cannot write pid file %s: %s", self.worker, self.pid_file, exc)
        log.info("worker %s: started pid %d with profile %s", self.worker, proc.pid, profile.name)

    def _open_log(self) -> int:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> int:
        code = await proc.wait()
        self._exit = code
        with contextlib.suppress(OSError):
            await self._threads.run(self.pid_file.unlink, missing_ok=True)
        if not self._stopping:
            # Not restarted here: a crash-looping worker is the policy's to judge, within budget.
            log.warning("worker %s: pid %d %s", self.worker, proc.pid, describe_exit(code))
        return code

    async def _stop(self) -> None:
        proc, watch = self._proc, self._watch
        if proc is not None and watch is not None and proc.returncode is None:
            self._stopping = True
            started = time.monotonic()
            self._killed = not await self._terminate(proc.pid, watch)
            if not watch.done():
                raise BackendError(f"worker {self.worker}: pid {proc.pid} survived SIGKILL (stuck in the kernel?)")
            await watch
            log.info(
                "worker %s: stopped pid %d in %.1fs%s",
                self.worker,
                proc.pid,
                time.monotonic() - started,
                " (SIGKILL)" if self._killed else "",
            )
            return
        adopted = await self._adopted() if proc is None else None
        if adopted is not None:
            await self._terminate(adopted, None)
            with contextlib.suppress(OSError):
                await self._threads.run(self.pid_file.unlink, missing_ok=True)
            log.info("worker %s: stopped adopted pid %d", self.worker, adopted)

    async def _terminate(self, pgid: int, leader: asyncio.Task[int] | None) -> bool:
        """SIGTERM, then SIGKILL after stop_timeout; True when SIGTERM was enough."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout
        signal_group(pgid, signal.SIGTERM)
        if await self._gone(pgid, leader, deadline):
            return True
        log.warning("worker %s: still running %gs after SIGTERM, sending SIGKILL", self.worker, self.stop_timeout)
        signal_group(pgid, signal.SIGKILL)
        if not await self._gone(pgid, leader, loop.time() + _KILL_WAIT_S):
            log.error("worker %s: process group %d survived SIGKILL for %gs", self.worker, pgid, _KILL_WAIT_S)
        return False

    @staticmethod
    async def _gone(pgid: int, leader: asyncio.Task[int] | None, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        if leader is not None:
            # The leader's exit is an event (our child); shield it: the watch task outlives this wait.
            try:
                await wait_for(asyncio.shield(leader), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return False
        return await wait_group(pgid, max(0.0, deadline - loop.time()))

    async def _adopted(self) -> int | None:
        """Pid of a child left running by an earlier Sentinel (see the module doc), if any."""
        try:
            text = await self._threads.run(self.pid_file.read_text)
        except (OSError, UnicodeDecodeError):
            return None
        parts = text.split()
        try:
            pid, started = int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            return None
        now = await self._threads.run(process_identity, pid, self._proc_root)
        # Same start time: the same process, not a reused pid; its own session: ours to stop.
        if now is None or now != (pid, started):
            return None
        return pid
