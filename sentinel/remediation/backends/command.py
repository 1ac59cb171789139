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
(it runs in its own session) is killed. Commands run through `tracked.run_tracked`:
while one runs it is recorded under `<state_dir>/running/`, so a Sentinel restarted
after a crash waits for it (or kills it at its deadline) before it verifies the worker
or acts again (issue 15, C4). Blocking file work runs on the backend's own threads,
never on the default executor that queries share.

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

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sentinel.remediation.backend import ActionContext, BackendError, UnitState
from sentinel.remediation.backends.children import child_environ, describe_exit
from sentinel.remediation.backends.envfile import PROFILE_KEY, read_profile_name, write_profile
from sentinel.remediation.backends.tracked import quote_output, record_path, run_tracked
from sentinel.remediation.settings import CommandBackendConfig, Profile
from sentinel.runtime.threads import WorkerThreads

__all__ = ["CommandBackend"]

log = logging.getLogger(__name__)

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
        threads: WorkerThreads | None = None,
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
        self.state_dir = state_dir
        self.record_file = state_dir / "workers" / f"{worker}.env"
        self._threads = threads or WorkerThreads(f"backend-{worker}", 2)

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
            code, _output = await run_tracked(
                argv,
                env=env,
                timeout=min(self.timeout, _STATUS_TIMEOUT_S),
                what="status command",
                record=None,  # observes only: nothing to wait for after a crash
                threads=self._threads,
                cwd=self.cwd,
            )
        except BackendError as exc:
            return UnitState("unknown", str(exc))
        return UnitState(_LSB_STATES.get(code, "unknown"), f"status command {describe_exit(code)}")

    async def active_profile(self) -> str | None:
        """The profile last applied successfully by this backend; None if never."""
        try:
            return await self._threads.run(read_profile_name, self.record_file)
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
        try:
            code, output = await run_tracked(
                argv,
                env=env,
                timeout=self.timeout,
                what=f"{verb} command",
                record=record_path(self.state_dir, self.worker, verb),
                threads=self._threads,
                cwd=self.cwd,
            )
        except BackendError as exc:
            raise BackendError(f"worker {self.worker}: {exc}") from None
        if code != 0:
            raise BackendError(f"worker {self.worker}: {verb} command {describe_exit(code)}{quote_output(output)}")
        log.info("worker %s: %s command done in %.1fs", self.worker, verb, time.monotonic() - started)
        if output:
            log.debug("worker %s: %s command output: %s", self.worker, verb, output)

    async def _record(self, profile: Profile) -> None:
        try:
            await self._threads.run(write_profile, self.record_file, profile)
        except (OSError, ValueError) as exc:
            # The verb itself succeeded; only the memory of it is lost.
            log.warning("worker %s: cannot record profile in %s: %s", self.worker, self.record_file, exc)
