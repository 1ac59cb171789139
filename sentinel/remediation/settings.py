"""Configuration of workers' launch profiles and backends, and of the remediation policy."""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from sentinel.config.base import Duration, Frozen, parse_duration
from sentinel.remediation.rebalance_params import REBALANCE_PARAMS, RebalanceSettings

__all__ = [
    "ACTIONS",
    "Backend",
    "BudgetConfig",
    "CircuitBreakerConfig",
    "CommandBackendConfig",
    "ControlConfig",
    "EXEC_PARAMS",
    "EscalationStep",
    "ProcessBackendConfig",
    "Profile",
    "RemediationConfig",
    "RouteConfig",
    "SystemdBackendConfig",
]

ACTIONS = (
    "restart",
    "reduce_batch",
    "quantized_fallback",
    "restore",
    "stop",
    "exec",
    "notify_only",
    "rebalance_experts",
)
Action = Literal[
    "restart", "reduce_batch", "quantized_fallback", "restore", "stop", "exec", "notify_only", "rebalance_experts"
]

# Parameters each action understands; anything else is a typo and refused at load.
EXEC_PARAMS = ("argv", "timeout", "verify", "disruptive")
_ACTION_PARAMS: dict[str, tuple[str, ...]] = {"exec": EXEC_PARAMS, "rebalance_experts": REBALANCE_PARAMS}
_LADDER_ACTIONS = ("restart", "reduce_batch", "quantized_fallback", "stop")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Profile(Frozen):
    """One rung of a worker's launch ladder: environment values, e.g. MAX_NUM_SEQS=16."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    env: dict[str, str] = Field(default_factory=dict, description="Environment the worker starts with.")
    batch_limit: int | None = Field(None, gt=0, description="Batch limit this profile implies (live probe path).")
    quantized: bool = Field(False, description="A quantized profile (the target of quantized_fallback).")
    eplb: bool = Field(
        False,
        description="The engine balances experts itself with this profile (vLLM --enable-eplb, SGLang "
        "--enable-eplb): the target of rebalance_experts for a worker that cannot rebalance live.",
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"invalid environment variable name {name!r}")
            if "\n" in value or "\0" in value:
                raise ValueError(f"{name}: values cannot contain newlines or NUL")
        return v


class SystemdBackendConfig(Frozen):
    """Restart a systemd unit over D-Bus; the active profile goes to its EnvironmentFile=."""

    type: Literal["systemd"]
    unit: str = Field(description="Unit name, e.g. vllm@qwen3.service.")
    env_file: str = Field(description="The unit's EnvironmentFile=, rewritten atomically before a restart.")
    bus: Literal["system", "session"] = "system"
    bus_address: str | None = Field(None, description="Explicit D-Bus address (tests, containers).")
    job_timeout: Duration = Field(120.0, gt=0, description="How long to wait for a start/stop/restart job.")


class ProcessBackendConfig(Frozen):
    """Sentinel runs the worker as a supervised child (demo, hosts without systemd)."""

    type: Literal["process"]
    argv: tuple[str, ...] = Field(min_length=1, description="Command and arguments; never run through a shell.")
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict, description="Environment added to every profile's.")
    log_file: str | None = Field(None, description="Where output goes; default <state_dir>/workers/<name>.log.")
    stop_timeout: Duration = Field(10.0, gt=0, description="SIGTERM, then SIGKILL after this long.")


class CommandBackendConfig(Frozen):
    """Operator-given argv per verb; alert context arrives in SENTINEL_* environment variables."""

    type: Literal["command"]
    start: tuple[str, ...] | None = None
    stop: tuple[str, ...] | None = None
    restart: tuple[str, ...] | None = None
    apply_profile: tuple[str, ...] | None = None
    timeout: Duration = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _some_verb(self) -> CommandBackendConfig:
        if not any((self.start, self.stop, self.restart, self.apply_profile)):
            raise ValueError("give at least one of start, stop, restart, apply_profile")
        return self


Backend = Annotated[SystemdBackendConfig | ProcessBackendConfig | CommandBackendConfig, Field(discriminator="type")]


class RouteConfig(Frozen):
    """Send alerts whose labels match to an action (first matching route wins)."""

    match: dict[str, str] = Field(default_factory=dict, description="Label equality matchers.")
    match_re: dict[str, str] = Field(default_factory=dict, description="Fully anchored regex matchers.")
    action: Action
    params: dict[str, str] = Field(default_factory=dict, description="Action parameters, e.g. argv for exec.")
    continue_: bool = Field(False, alias="continue", description="Also try later routes.")

    @field_validator("match_re")
    @classmethod
    def _regexes(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{name}: not a valid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _params_fit_action(self) -> RouteConfig:
        allowed = _ACTION_PARAMS.get(self.action, ())
        unknown = sorted(set(self.params) - set(allowed))
        if unknown:
            known = ", ".join(allowed) if allowed else "none"
            raise ValueError(f"params: {', '.join(unknown)} not understood by {self.action} (it takes: {known})")
        if self.action == "exec":
            # The argv is the operator's own text, split like a shell would but never run by one.
            try:
                argv = shlex.split(self.params.get("argv", ""))
            except ValueError as exc:
                raise ValueError(f"params.argv: {exc}") from None
            if not argv:
                raise ValueError("params.argv: exec needs a command, e.g. argv: '/usr/local/bin/dump-state --all'")
            if "timeout" in self.params:
                parse_duration(self.params["timeout"])
            for flag in ("verify", "disruptive"):
                if self.params.get(flag, "false") not in ("true", "false"):
                    raise ValueError(f"params.{flag}: expected 'true' or 'false'")
        if self.action == "rebalance_experts":
            RebalanceSettings.from_params(self.params)  # a ValueError names the parameter
        return self


class EscalationStep(Frozen):
    """One rung of the escalation ladder: an action tried `times` times before the next."""

    action: Action
    times: int = Field(1, gt=0)

    @field_validator("action")
    @classmethod
    def _ladder_action(cls, v: str) -> str:
        if v not in _LADDER_ACTIONS:
            raise ValueError(f"a ladder step is one of {', '.join(_LADDER_ACTIONS)}; {v} needs an alert's context")
        return v


class BudgetConfig(Frozen):
    count: int = Field(3, gt=0, description="At most this many of one action on one worker ...")
    window: Duration = Field(3600.0, gt=0, description="... within this window.")


class CircuitBreakerConfig(Frozen):
    max_ratio: float = Field(0.5, gt=0, le=1, description="Stop acting when more than this share of workers ...")
    window: Duration = Field(600.0, gt=0, description="... were remediated within this window.")
    min_workers: int = Field(
        2, gt=0, description="... and at least this many: one sick worker on a small host is not a host-wide fault."
    )


def _default_ladder() -> tuple[EscalationStep, ...]:
    return (
        EscalationStep(action="reduce_batch", times=2),
        EscalationStep(action="quantized_fallback", times=1),
        EscalationStep(action="restart", times=3),
    )


class RemediationConfig(Frozen):
    mode: Literal["act", "observe"] = Field(
        "observe", description="observe decides, journals and notifies what it would do, and never acts."
    )
    routes: tuple[RouteConfig, ...] = Field((), description="Before the rule's own `action` label.")
    cooldown: Duration = Field(
        300.0, ge=0, description="Least time between two alert-triggered actions of one kind on one worker."
    )
    budget: BudgetConfig = BudgetConfig()
    ladder: tuple[EscalationStep, ...] = Field(default_factory=_default_ladder)
    max_concurrent: int = Field(1, gt=0, description="Disruptive actions in flight at once on this host.")
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    verify_timeout: Duration = Field(180.0, gt=0, description="Time for a worker to be healthy after an action.")
    verify_interval: Duration = Field(1.0, gt=0, description="How often verification reads the worker's health.")
    stable_for: Duration = Field(1800.0, gt=0, description="Quiet time before stepping back up one rung.")


class ControlConfig(Frozen):
    """The mutating API (pause, resume, silence)."""

    token_file: str | None = Field(
        None, description="Bearer token file (e.g. $CREDENTIALS_DIRECTORY/control-token); none disables the API."
    )
