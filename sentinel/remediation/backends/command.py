"""The command backend: an operator-given argv per verb, alert context in the environment.

Each verb runs its argv with `asyncio.create_subprocess_exec`: no shell, and the argv
is used exactly as configured (no templating), so nothing a monitored system sends
(alert labels, log text) can become part of a command line. The context arrives in the
environment only: os.environ, then the profile's `env`, then
`ActionContext.environment()` (`SENTINEL_WORKER`, `SENTINEL_ACTION`,
`SENTINEL_ALERTNAME`, `SENTINEL_FINGERPRINT`, `SENTINEL_PROFILE`,
`SENTINEL_PREVIOUS_PROFILE`, `SENTINEL_LABEL_<NAME>`), then `SENTINEL_VERB` and the
`SENTINEL_PROFILE` being applied.

A command succeeds with exit status 0. Any other status, or running past `timeout`, is
a `BackendError` quoting the end of its output; on timeout its whole process group
(it runs in its own session) is killed. Output goes to a temporary file rather than a
pipe, so a command that leaves a daemon behind holding its stdout cannot hang the verb.

Verbs:
- `start`, `stop`: their argv; not configured is a `BackendError`.
- `restart(profile)`: a profile change (the requested profile differs from the last one
  applied, or that one is unknown) runs `apply_profile` when configured; otherwise
  `restart`; failing that `apply_profile`; failing that `stop` then `start`.
- `state()`: `unknown`, because the configuration has no status command: the policy
  verifies a worker through its endpoint and process instead. A `status` argv given to
  the constructor is run with LSB `status` exit codes (0 running, 3 stopped, 1-2 failed,
  anything else unknown), as init scripts and `systemctl is-active`-style tools answer.

The profile applied last is recorded in `<state_dir>/workers/<name>.env` (the same
format as the other backends), so `active_profile()` survives a restart of Sentinel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from sentinel.remediation.backend import ActionContext, BackendError, UnitState
from sentinel.remediation.backends.children import child_environ, describe_exit, signal_group
from sentinel.remediation.backends.envfile import PROFILE_KEY, read_profile_name, write_profile
from sentinel.remediation.settings import CommandBackendConfig, Profile

__all__ = ["CommandBackend"]

log = logging.getLogger(__name__)

_OUTPUT_TAIL = 2000  # bytes of a failed command's output quoted in the error
_KILL_WAIT_S = 5.0
_STATUS_TIMEOUT_S = 30.0
_LSB_STATES = {0: "active", 1: "failed", 2: "failed", 3: "inactive"}


class CommandBackend:
    """Runs the operator's commands for one worker; see the module doc."""

    def __init__(
        self,
        worker: str,
        *,
        state_dir: Path,
        start: Sequence[str] | None = None,
        stop: Sequence[str] | None = None,
        restart: Sequence[str] | None = None,
        apply_profile: Sequence[str] | None = None,
        status: Sequence[str] | None = None,
        timeout: float = 120.0,
        cwd: str | None = None,
    ) -> None:
        self.worker = worker
        self.commands: dict[str, tuple[str, ...]] = {
            verb: tuple(argv)
            for verb, argv in (
                ("start", start),
                ("stop", stop),
                ("restart", restart),
                ("apply_profile", apply_profile),
                ("status", status),
            )
            if argv
        }
        self.timeout = timeout
        self.cwd = cwd
        self.record_file = state_dir / "workers" / f"{worker}.env"

    @classmethod
    def from_config(cls, worker: str, cfg: CommandBackendConfig, state_dir: Path) -> CommandBackend:
        """A backend for `worker` as `sentinel.yaml` describes it."""
        return cls(
            worker,
            state_dir=state_dir,
            start=cfg.start,
            stop=cfg.stop,
            restart=cfg.restart,
            apply_profile=cfg.apply_profile,
            timeout=cfg.timeout,
        )

    async def start(self, profile: Profile, ctx: ActionContext) -> None:
        """Run the `start` command with `profile` in the environment."""
        await self._run_verb("start", self._env(ctx, "start", profile))
        await self._record(profile)

    async def stop(self, ctx: ActionContext) -> None:
        """Run the `stop` command."""
        await self._run_verb("stop", self._env(ctx, "stop", None))

    async def restart(self, profile: Profile, ctx: ActionContext) -> None:
        """Restart with `profile`: `apply_profile` on a profile change, else `restart` (module doc)."""
        current = await self.active_profile() or ctx.previous_profile or None
        changed = current != profile.name
        if "apply_profile" in self.commands and (changed or "restart" not in self.commands):
            await self._run_verb("apply_profile", self._env(ctx, "apply_profile", profile))
        elif "restart" in self.commands:
            await self._run_verb("restart", self._env(ctx, "restart", profile))
        elif "start" in self.commands and "stop" in self.commands:
            await self._run_verb("stop", self._env(ctx, "stop", profile))
            await self._run_verb("start", self._env(ctx, "start", profile))
        else:
            raise BackendError(f"worker {self.worker}: no restart, apply_profile or stop+start command configured")
        await self._record(profile)

    async def state(self) -> UnitState:
        """`unknown` unless a status command was given; then its LSB exit status (module doc)."""
        argv = self.commands.get("status")
        if argv is None:
            return UnitState("unknown", "the command backend has no status command")
        env = child_environ({"SENTINEL_WORKER": self.worker, "SENTINEL_VERB": "status"})
        try:
            code, _output = await self._exec("status", argv, env, min(self.timeout, _STATUS_TIMEOUT_S))
        except BackendError as exc:
            return UnitState("unknown", str(exc))
        return UnitState(_LSB_STATES.get(code, "unknown"), f"status command {describe_exit(code)}")

    async def active_profile(self) -> str | None:
        """The profile last applied successfully by this backend; None if never."""
        try:
            return await asyncio.to_thread(read_profile_name, self.record_file)
        except OSError as exc:
            log.warning("worker %s: cannot read %s: %s", self.worker, self.record_file, exc)
            return None

    async def close(self) -> None:
        """Nothing to release: every command has finished when its verb returns."""

    def _env(self, ctx: ActionContext, verb: str, profile: Profile | None) -> dict[str, str]:
        layers: list[Mapping[str, str]] = []
        if profile is not None:
            layers.append(profile.env)
        layers.append(ctx.environment())
        layers.append({"SENTINEL_VERB": verb, "SENTINEL_WORKER": self.worker})
        if profile is not None:
            layers.append({PROFILE_KEY: profile.name})
        env = child_environ(*layers)
        for key, value in env.items():
            if "\0" in value:
                # The one byte an environment cannot carry; a label value from a monitored
                # system should not be able to stop a remediation, so mark it and go on.
                log.warning("worker %s: NUL in %s replaced by U+FFFD", self.worker, key)
                env[key] = value.replace("\0", "\ufffd")
        return env

    async def _run_verb(self, verb: str, env: dict[str, str]) -> None:
        argv = self.commands.get(verb)
        if argv is None:
            raise BackendError(f"worker {self.worker}: no {verb} command configured")
        started = time.monotonic()
        code, output = await self._exec(verb, argv, env, self.timeout)
        if code != 0:
            raise BackendError(f"worker {self.worker}: {verb} command {describe_exit(code)}{_quote_output(output)}")
        log.info("worker %s: %s command done in %.1fs", self.worker, verb, time.monotonic() - started)
        if output:
            log.debug("worker %s: %s command output: %s", self.worker, verb, output)

    async def _exec(self, verb: str, argv: Sequence[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
        out = await asyncio.to_thread(tempfile.TemporaryFile)
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out.fileno(),
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    cwd=self.cwd,
                    start_new_session=True,  # its own group: a timeout kills what it spawned too
                )
            except (OSError, ValueError) as exc:
                raise BackendError(f"worker {self.worker}: cannot run {verb} command {argv[0]!r}: {exc}") from exc
            try:
                code = await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                await self._kill(proc)
                output = await asyncio.to_thread(_tail, out)
                raise BackendError(
                    f"worker {self.worker}: {verb} command did not finish within {timeout:g}s; "
                    f"killed its process group{_quote_output(output)}"
                ) from None
            except asyncio.CancelledError:
                # The caller gave up: do not leave the command acting on the worker behind its back.
                await self._kill(proc)
                raise
            return code, await asyncio.to_thread(_tail, out)
        finally:
            out.close()

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        signal_group(proc.pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(proc.wait(), _KILL_WAIT_S)
        except asyncio.TimeoutError:
            log.error("worker %s: command pid %d survived SIGKILL for %gs", self.worker, proc.pid, _KILL_WAIT_S)

    async def _record(self, profile: Profile) -> None:
        try:
            await asyncio.to_thread(write_profile, self.record_file, profile)
        except (OSError, ValueError) as exc:
            # The verb itself succeeded; only the memory of it is lost.
            log.warning("worker %s: cannot record profile in %s: %s", self.worker, self.record_file, exc)


def _tail(f: IO[bytes]) -> str:
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - _OUTPUT_TAIL))
    return f.read().decode("utf-8", errors="replace").strip()


def _quote_output(output: str) -> str:
    return f"; output: {output}" if output else ""
