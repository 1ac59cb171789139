"""Performing a planned action: the backend verb, the live batch limit, or the operator's command.

`perform` is the one place an action reaches a worker. Label values from monitored
systems travel only in `ActionContext` (the environment of commands), never in argv.
`exec` runs the operator's argv, never through a shell, tracked on disk like a command
backend's verbs (`backends.tracked`), so a Sentinel restarted mid-command waits for it.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from sentinel.config.base import parse_duration
from sentinel.remediation.backend import ActionContext, BackendError, LiveControl, WorkerBackend
from sentinel.remediation.backends.children import child_environ, describe_exit
from sentinel.remediation.backends.tracked import quote_output, record_path, run_tracked
from sentinel.remediation.policy import Plan
from sentinel.remediation.settings import Profile
from sentinel.runtime.threads import WorkerThreads

__all__ = ["EXEC_TIMEOUT_S", "perform", "run_exec"]

EXEC_TIMEOUT_S = 60.0


async def perform(
    plan: Plan,
    ctx: ActionContext,
    profile: Profile,
    *,
    backend: WorkerBackend | None,
    live: LiveControl | None,
    state_dir: Path,
    threads: WorkerThreads,
) -> None:
    """Carry `plan` out on `ctx.worker` with `profile` as the target; raises BackendError."""
    if plan.action == "exec":
        await run_exec(plan.params, ctx, state_dir, threads)
        return
    if plan.live:
        if live is None or profile.batch_limit is None:
            raise BackendError(f"worker {ctx.worker}: no live batch-limit control")
        await live.set_batch_limit(ctx.worker, profile.batch_limit)
        return
    if backend is None:
        raise BackendError(f"worker {ctx.worker} has no backend")
    if plan.action == "stop":
        await backend.stop(ctx)
    else:
        await backend.restart(profile, ctx)


async def run_exec(params: Mapping[str, str], ctx: ActionContext, state_dir: Path, threads: WorkerThreads) -> None:
    """The operator's command, never through a shell; alert context in SENTINEL_* variables."""
    argv = shlex.split(params["argv"])
    timeout = parse_duration(params["timeout"]) if "timeout" in params else EXEC_TIMEOUT_S
    code, output = await run_tracked(
        argv,
        env=child_environ(ctx.environment()),
        timeout=timeout,
        what=argv[0],
        record=record_path(state_dir, ctx.worker, "exec"),
        threads=threads,
    )
    if code != 0:
        tail = output[-300:]
        raise BackendError(f"{argv[0]} {describe_exit(code)}{quote_output(tail)}")
