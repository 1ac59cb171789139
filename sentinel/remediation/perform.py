"""Performing a planned action: the backend verb, the live batch limit or placement, or the operator's command.

`perform` is the one place an action reaches a worker.

The live batch limit needs a running engine: when the probe has gone (the OOM that
asked for `reduce_batch` killed the engine, so nothing will ever acknowledge the
limit), the same step down is carried out by restarting the worker with the target
profile, if it has a backend. A live `rebalance_experts` plans, applies, verifies and
rolls back through the probe (`sentinel.remediation.rebalance`). Label values from monitored
systems travel only in `ActionContext` (the environment of commands), never in argv.
`exec` runs the operator's argv, never through a shell, tracked on disk like a command
backend's verbs (`backends.tracked`), so a Sentinel restarted mid-command waits for it.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping
from pathlib import Path

from sentinel.config.base import parse_duration
from sentinel.remediation.backend import ActionContext, BackendError, LiveControl, LivePlacement, WorkerBackend
from sentinel.remediation.backends.children import child_environ, describe_exit
from sentinel.remediation.backends.tracked import quote_output, record_path, run_tracked
from sentinel.remediation.policy import Plan
from sentinel.remediation.rebalance_params import RebalanceSettings
from sentinel.remediation.settings import Profile
from sentinel.runtime.threads import WorkerThreads

__all__ = ["EXEC_TIMEOUT_S", "perform", "run_exec"]

EXEC_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


async def perform(
    plan: Plan,
    ctx: ActionContext,
    profile: Profile,
    *,
    backend: WorkerBackend | None,
    live: LiveControl | None,
    state_dir: Path,
    threads: WorkerThreads,
    verify_timeout: float = 180.0,
) -> str:
    """Carry `plan` out on `ctx.worker` with `profile` as the target; what it did, or BackendError."""
    if plan.action == "exec":
        await run_exec(plan.params, ctx, state_dir, threads)
        return ""
    if plan.live and plan.action == "rebalance_experts":
        if not isinstance(live, LivePlacement):
            raise BackendError(f"worker {ctx.worker}: no live expert-placement control")
        return await live.rebalance_experts(ctx.worker, RebalanceSettings.from_params(plan.params, verify_timeout))
    if plan.live:
        if live is None or profile.batch_limit is None:
            raise BackendError(f"worker {ctx.worker}: no live batch-limit control")
        if live.supports_live_batch_limit(ctx.worker):
            try:
                await live.set_batch_limit(ctx.worker, profile.batch_limit)
                still_reporting = getattr(live, "still_reporting", None)
                if backend is None or still_reporting is None or await still_reporting(ctx.worker):
                    return ""
                # Acknowledged by a process on its way down (the OOM killed its engine).
                log.warning(
                    "worker %s: the probe stopped reporting right after taking the batch limit; "
                    "restarting it with profile %s",
                    ctx.worker,
                    profile.name,
                )
            except BackendError as exc:
                if backend is None or live.supports_live_batch_limit(ctx.worker):
                    raise  # the probe still reports: the limit was refused or lost, not the engine
                log.warning("worker %s: %s; restarting it with profile %s instead", ctx.worker, exc, profile.name)
        elif backend is None:
            raise BackendError(
                f"worker {ctx.worker}: the probe stopped reporting and there is no backend to restart it"
            )
        else:
            log.warning(
                "worker %s: the probe stopped reporting (engine down?); restarting it with profile %s",
                ctx.worker,
                profile.name,
            )
        await backend.restart(profile, ctx)
        return f"the engine was down: restarted with profile {profile.name} instead of a live batch limit"
    if backend is None:
        raise BackendError(f"worker {ctx.worker} has no backend")
    if plan.action == "stop":
        await backend.stop(ctx)
    else:
        await backend.restart(profile, ctx)
    return ""


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
