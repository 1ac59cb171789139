"""`sentinel.yaml`: the configuration, validated once into frozen objects.

Every problem in a file is reported together, each with its file, line and field path
(`sentinel.yaml:12:5: workers.0.gpus: ...`). Unknown keys are errors: a typo in a
safety limit must not silently fall back to a default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sentinel.api.settings import HttpConfig
from sentinel.collectors.canary_config import CanaryConfig
from sentinel.collectors.probe_settings import ProbeConfig
from sentinel.config.base import Duration, Frozen, parse_duration
from sentinel.config.yamlpos import YamlError, load_with_positions, position_of
from sentinel.fleet.config import FleetConfig, check_against_workers
from sentinel.notify.settings import NotifyConfig
from sentinel.remediation.settings import Backend, ControlConfig, Profile, RemediationConfig

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_PORT",
    "MAX_CONFIG_BYTES",
    "CollectorsConfig",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "EndpointCollectorConfig",
    "HostCollectorConfig",
    "LogCollectorConfig",
    "LogConfig",
    "LogPattern",
    "LogSource",
    "NcclRasCollectorConfig",
    "NvmlCollectorConfig",
    "ProcessMatch",
    "RulesConfig",
    "StoreConfig",
    "WorkerConfig",
    "XidOverride",
    "load_config",
    "parse_config",
    "parse_duration",
]

# 9100 is node_exporter, 9400 dcgm-exporter, 9090/9093 Prometheus/Alertmanager.
DEFAULT_PORT = 9847
# Loopback by default: the control API can act on workers. Bind a routable address
# (listen: "0.0.0.0:9847") when a Prometheus on another host scrapes this one.
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"


class LogConfig(Frozen):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class StoreConfig(Frozen):
    retention: Duration = Field(900.0, gt=0, description="How long samples are kept in memory.")
    lookback: Duration = Field(300.0, gt=0, description="Instant-vector lookback, as Prometheus's.")


class XidOverride(Frozen):
    """Changes the built-in policy for one Xid."""

    xid_class: Literal["hardware", "application", "informational"] | None = Field(None, alias="class")
    action: str | None = None
    description: str | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class NvmlCollectorConfig(Frozen):
    enabled: bool = True
    interval: Duration = Field(1.0, gt=0)
    timeout: Duration = Field(2.0, gt=0, description="Bound on one whole pass.")
    call_timeout: Duration = Field(1.0, gt=0, description="Bound on the NVML calls of one GPU in one pass.")
    xid_events: bool = Field(True, description="Wait for Xid events through nvmlEventSetWait.")
    kernel_log: Literal["auto", "kmsg", "journal", "off"] = Field(
        "auto",
        description="Where the host's kernel log is read (NVRM Xids, GPUs fallen off the bus, OOM kills), once "
        "for the NVML and log collectors: /dev/kmsg, `journalctl --dmesg --follow`, the first that works (auto), "
        "or not at all.",
    )
    xid_overrides: dict[int, XidOverride] = Field(default_factory=dict)


class HostCollectorConfig(Frozen):
    enabled: bool = True
    interval: Duration = Field(1.0, gt=0)
    timeout: Duration = Field(2.0, gt=0)
    cgroup_root: str = "/sys/fs/cgroup"
    proc_root: str = "/proc"


class EndpointCollectorConfig(Frozen):
    """Health probe and /metrics scrape of every worker that has an `endpoint`."""

    enabled: bool = True
    interval: Duration = Field(1.0, gt=0)
    health_timeout: Duration = Field(1.0, gt=0, description="Bound on one /health request.")
    scrape_timeout: Duration = Field(2.0, gt=0, description="Bound on one /metrics scrape.")
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0, description="Larger /metrics bodies are refused.")
    # Prometheus's scrape_config limits, under its names; crossing one fails the scrape.
    sample_limit: int = Field(5000, gt=0, description="A /metrics body with more series fails the scrape.")
    label_limit: int = Field(64, gt=0, description="Most labels on one scraped series.")
    label_name_length_limit: int = Field(256, gt=0, description="Longest label name of a scraped series.")
    label_value_length_limit: int = Field(4096, gt=0, description="Longest label value of a scraped series.")
    series_limit: int = Field(
        10000,
        gt=0,
        description="Series one worker's scrapes may hold in the store (churning names included); beyond it "
        "the oldest ended ones are dropped, then new ones refused (counted).",
    )


class LogPattern(Frozen):
    """One entry of the log pattern catalogue: the built-in ones (sentinel/data) and the operator's."""

    id: str = Field(pattern=r"^[a-z_][a-z0-9_]*$")
    regex: str = Field(
        description="RE2 syntax (linear time: no lookarounds or backreferences), searched in one line; "
        "`{{head}}` names the shared line-head grammar of the built-in catalogue."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Label name -> named regex group (or a literal value prefixed with '=')."
    )
    value: str | None = Field(None, description="Named group holding the event's numeric value.")
    keywords: tuple[str, ...] = Field(
        (),
        description="Literal strings, one of which is in every line the regex matches: lines without any are "
        "skipped before the regex runs (faster). Without keywords the regex itself filters.",
    )

    @field_validator("keywords")
    @classmethod
    def _one_line_keywords(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not k or "\n" in k for k in v):
            raise ValueError("expected non-empty one-line strings")
        return v

    @model_validator(mode="after")
    def _compiles(self, info: ValidationInfo) -> LogPattern:
        # Imported here: the log package imports this module.
        from sentinel.logs.patterns import compile_entry

        context = info.context if isinstance(info.context, dict) else {}
        compile_entry(self, context.get("fragments"))
        return self


class LogCollectorConfig(Frozen):
    enabled: bool = True
    poll_interval: Duration = Field(0.25, gt=0, description="Fallback polling when inotify is unavailable.")
    rescan_interval: Duration = Field(2.0, gt=0, description="How often globs are re-expanded for new files.")
    max_line_bytes: int = Field(
        1024 * 1024,
        gt=0,
        description="Longer lines are cut to this length and counted in sentinel_log_lines_truncated_total; "
        "patterns see the first 16 KiB of each line.",
    )
    patterns: tuple[LogPattern, ...] = Field((), description="Extra patterns added to the built-in catalogue.")


class NcclRasCollectorConfig(Frozen):
    interval: Duration = Field(5.0, gt=0)
    timeout: Duration = Field(2.0, gt=0)


class CollectorsConfig(Frozen):
    nvml: NvmlCollectorConfig = NvmlCollectorConfig()
    host: HostCollectorConfig = HostCollectorConfig()
    endpoint: EndpointCollectorConfig = EndpointCollectorConfig()
    logs: LogCollectorConfig = LogCollectorConfig()
    nccl_ras: NcclRasCollectorConfig = NcclRasCollectorConfig()


class ProcessMatch(Frozen):
    """How to find a worker's processes; give exactly one way."""

    pid_file: str | None = None
    systemd_unit: str | None = None
    cmdline: str | None = Field(None, description="Regular expression searched in the joined command line.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ProcessMatch:
        given = [k for k in ("pid_file", "systemd_unit", "cmdline") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of pid_file, systemd_unit, cmdline")
        if self.cmdline is not None:
            try:
                re.compile(self.cmdline)
            except re.error as exc:
                raise ValueError(f"cmdline is not a valid regular expression: {exc}") from None
        return self


_WORKER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class LogSource(Frozen):
    """One log source of a worker: files by glob, or a systemd unit's journal."""

    path: str | None = Field(None, description="File path or glob, e.g. /var/log/vllm/*.log.")
    journal_unit: str | None = Field(None, description="systemd unit whose journal is followed.")

    @model_validator(mode="after")
    def _exactly_one(self) -> LogSource:
        if (self.path is None) == (self.journal_unit is None):
            raise ValueError("give exactly one of path, journal_unit")
        return self


class WorkerConfig(Frozen):
    name: str
    gpus: tuple[int, ...] = ()
    endpoint: str | None = Field(None, description="Base URL of the serving endpoint, e.g. http://127.0.0.1:8000.")
    engine: Literal["vllm", "sglang", "generic"] = "generic"
    health_path: str | None = Field(None, description="Health probe path; default from the engine preset (/health).")
    metrics_path: str | None = Field(None, description="Metrics path; default /metrics.")
    process: ProcessMatch | None = None
    logs: tuple[LogSource, ...] = ()
    nccl_ras: str | None = Field(None, description="HOST:PORT of NCCL's RAS service (default port 28028).")
    backend: Backend | None = Field(None, description="How Sentinel acts on this worker; none: observe only.")
    profiles: tuple[Profile, ...] = Field((), description="Launch ladder, best first (full, reduced, fp8, ...).")
    initial_profile: str | None = Field(None, description="Profile at first start; default the first.")
    probe: bool = Field(False, description="Runs sentinel.probe: batch limits can change live, without a restart.")
    probe_token_file: str | None = Field(
        None,
        description="Bearer token of this worker's probe (e.g. $CREDENTIALS_DIRECTORY/probe-qwen3): binds its "
        "reports to this worker; required for reports over TCP.",
    )
    canary: CanaryConfig = Field(
        CanaryConfig(), description="Active canary: a one-token request that shows a stall while no traffic flows."
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels of the worker in the fleet (e.g. model: qwen3-480b): fleet.budget.per_label pools "
        "and `sentinel fleet status`.",
    )

    @field_validator("labels")
    @classmethod
    def _labels_valid(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _LABEL_NAME.match(name):
                raise ValueError(f"label name {name!r}: use letters, digits and '_', not starting with a digit")
            if not value or len(value) > 128:
                raise ValueError(f"label {name}: the value must be 1 to 128 characters")
        return v

    @model_validator(mode="after")
    def _token_needs_probe(self) -> WorkerConfig:
        if self.probe_token_file is not None and not self.probe:
            raise ValueError("probe_token_file: set probe: true as well (reports of a worker without it are refused)")
        return self

    @model_validator(mode="after")
    def _profiles_consistent(self) -> WorkerConfig:
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError("profiles: a profile name is used twice")
        if self.initial_profile is not None and self.initial_profile not in names:
            raise ValueError(f"initial_profile: {self.initial_profile!r} is not one of the profiles {names}")
        return self

    @field_validator("nccl_ras")
    @classmethod
    def _ras_address(cls, v: str | None) -> str | None:
        if v is not None:
            parse_ras_address(v)
        return v

    @field_validator("name")
    @classmethod
    def _name_is_label_safe(cls, v: str) -> str:
        if not _WORKER_NAME.match(v):
            raise ValueError("use letters, digits, '_', '-' and '.', starting with a letter or '_'")
        return v

    @field_validator("gpus")
    @classmethod
    def _gpus_distinct(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(g < 0 for g in v):
            raise ValueError("GPU indices are 0 or more")
        if len(set(v)) != len(v):
            raise ValueError("a GPU is listed twice")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_http(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://[^/\s]+", v):
            raise ValueError("expected an http:// or https:// URL")
        return v


class RulesConfig(Frozen):
    """Prometheus rule files evaluated by Sentinel itself."""

    files: tuple[str, ...] = Field((), description="Rule files or globs, in Prometheus's rule file format.")
    interval: Duration = Field(1.0, gt=0, description="Default evaluation interval of a group.")
    external_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels added to every alert sent out, as Prometheus's external_labels."
    )
    external_url: str | None = Field(None, description="URL of this Sentinel in generatorURL; default from listen.")
    outage_tolerance: Duration = Field(3600.0, ge=0, description="Longest outage after which `for` state is restored.")
    for_grace_period: Duration = Field(600.0, ge=0, description="Least time left pending after a restore.")
    event_min_interval: Duration = Field(
        0.1, ge=0, description="At most one event-triggered evaluation of a group per this interval."
    )


class QueryConfig(Frozen):
    """Bounds of the PromQL query API (`/api/v1/query`, `query_range`, `series`, `labels`)."""

    timeout: Duration = Field(60.0, gt=0, description="A query running longer fails (Prometheus: --query.timeout).")
    max_samples: int = Field(
        1_000_000,
        gt=0,
        description="Samples one query may hold at once; more fails (Prometheus: --query.max-samples).",
    )
    max_concurrency: int = Field(
        2, gt=0, le=64, description="Queries evaluated at once; others wait (Prometheus: --query.max-concurrency)."
    )


class Config(Frozen):
    listen: str = Field(DEFAULT_LISTEN, description="HOST:PORT of the HTTP server (/metrics and the API).")
    state_dir: str | None = Field(
        None,
        description="Where state survives restarts; default $STATE_DIRECTORY, /var/lib/sentinel, "
        "or ~/.local/state/sentinel, whichever is writable first.",
    )
    expected_gpus: int | None = Field(
        None, ge=0, description="GPUs this host should have; default the count first seen (persisted)."
    )
    prometheus_compat: Literal[2, 3] = Field(
        3,
        description="Whose semantics rules follow: 3 (Prometheus 3: windows open on the left) or 2 "
        "(Prometheus 2: windows closed on the left, 2.42's rule file format); as --prometheus-compat.",
    )
    log: LogConfig = LogConfig()
    store: StoreConfig = StoreConfig()
    collectors: CollectorsConfig = CollectorsConfig()
    workers: tuple[WorkerConfig, ...] = ()
    rules: RulesConfig = RulesConfig()
    query: QueryConfig = QueryConfig()
    remediation: RemediationConfig = RemediationConfig()
    notify: NotifyConfig = NotifyConfig()
    control: ControlConfig = ControlConfig()
    http: HttpConfig = HttpConfig()
    probe: ProbeConfig = ProbeConfig()
    fleet: FleetConfig | None = Field(
        None, description="Join a fleet coordinated on etcd (docs/fleet.md); absent: this host heals alone."
    )

    @field_validator("listen")
    @classmethod
    def _listen_host_port(cls, v: str) -> str:
        split_listen(v)
        return v

    @model_validator(mode="after")
    def _workers_consistent(self) -> Config:
        seen: dict[str, int] = {}
        gpu_owner: dict[int, str] = {}
        for i, w in enumerate(self.workers):
            if w.name in seen:
                raise ValueError(f"workers.{i}.name: worker name {w.name!r} is already used by workers.{seen[w.name]}")
            seen[w.name] = i
            for g in w.gpus:
                if g in gpu_owner:
                    raise ValueError(f"workers.{i}.gpus: GPU {g} is already assigned to worker {gpu_owner[g]!r}")
                gpu_owner[g] = w.name
        return self

    def resolved_state_dir(self) -> Path:
        """The state directory to use, created if needed."""
        candidates: list[Path] = []
        if self.state_dir:
            candidates.append(Path(self.state_dir))
        else:
            if os.environ.get("STATE_DIRECTORY"):
                candidates.append(Path(os.environ["STATE_DIRECTORY"].split(":")[0]))
            candidates.append(Path("/var/lib/sentinel"))
            xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
            candidates.append(Path(xdg) / "sentinel")
        reasons: list[str] = []
        for path in candidates:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                reasons.append(f"{path}: {exc.strerror or exc}")
                continue
            if os.access(path, os.W_OK):
                return path
            # No exception to quote: say why here (a read-only mount, or another owner).
            reasons.append(f"{path}: not writable by uid {os.getuid()}")
        raise OSError(f"no writable state directory ({'; '.join(reasons)}); set state_dir in the config")


def split_listen(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT); port 0 picks a free port."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not m:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT} or [::1]:{DEFAULT_PORT}), got {value!r}")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host or "0.0.0.0", port


DEFAULT_RAS_PORT = 28028
_RAS_ADDRESS = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::(?P<p6>\d+))?|(?P<host>[^:\[\]]*)(?::(?P<port>\d+))?")


def parse_ras_address(value: str) -> tuple[str, int]:
    """(host, port) of NCCL's RAS service from `HOST`, `HOST:PORT` or `[V6]:PORT`; empty host is localhost."""
    m = _RAS_ADDRESS.fullmatch(value.strip())
    if m is None:
        raise ValueError(f"expected HOST, HOST:PORT or [IPv6]:PORT, got {value!r}")
    host = m.group("v6") or m.group("host") or "localhost"
    port = int(m.group("p6") or m.group("port") or DEFAULT_RAS_PORT)
    if not 0 < port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


class ConfigProblem:
    """One validation problem with its location."""

    def __init__(self, file: str, line: int | None, column: int | None, field: str, message: str) -> None:
        self.file, self.line, self.column, self.field, self.message = file, line, column, field, message

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ConfigError(Exception):
    """Every problem found in a config file, one per line in the message."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


MAX_CONFIG_BYTES = 1024 * 1024
"""A config file is a few kilobytes; a larger one (or a device, a FIFO) is refused unread."""


def parse_config(text: str, file: str = "<string>") -> Config:
    """Validate YAML text; raise ConfigError listing every problem."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigProblem(file, None, None, "", f"larger than {MAX_CONFIG_BYTES} bytes")])
    try:
        data, positions = load_with_positions(text, file)
    except YamlError as exc:
        raise ConfigError([ConfigProblem(file, exc.line, exc.column, "", exc.problem)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(file, 1, 1, "", "the top level must be a mapping of settings")])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, positions, file)) from None
    if config.fleet is not None:
        problems = check_against_workers(config.fleet, config.fleet.host_id, [w.name for w in config.workers])
        problems += _group_members_without_backend(config.fleet, config.workers)
        if problems:
            raise ConfigError([_located(p, positions, file) for p in problems])
    return config


def _group_members_without_backend(fleet: FleetConfig, workers: Sequence[WorkerConfig]) -> list[str]:
    """A member of a serving group on this host must be able to carry out its steps."""
    backend = {w.name: w.backend for w in workers}
    problems = []
    for gi, group in enumerate(fleet.groups):
        for mi, m in enumerate(group.members):
            if m.host == fleet.host_id and m.worker in backend and backend[m.worker] is None:
                problems.append(
                    f"fleet.groups.{gi}.members.{mi}.member: worker {m.worker!r} has no backend, so this host "
                    f"cannot carry out its steps of group {group.name!r} (stop, start): give it one"
                )
    return problems


def _located(problem: str, positions: dict[Any, Any], file: str) -> ConfigProblem:
    """A "field.path: message" problem found after validation, with its line and column."""
    path, _, message = problem.partition(": ")
    loc = [int(p) if p.isdigit() else p for p in path.split(".")]
    pos = position_of(positions, loc)
    return ConfigProblem(file, pos.line if pos else None, pos.column if pos else None, path, message)


def _problems(exc: ValidationError, positions: dict[Any, Any], file: str) -> list[ConfigProblem]:
    out = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        message = err["msg"].removeprefix("Value error, ")
        # Model-level checks put their own field path first ("workers.1.name: ..."): use it.
        m = re.match(r"([A-Za-z_][\w]*(?:\.[\w]+)*): (.*)", message, re.S)
        if not loc and m:
            loc = [int(p) if p.isdigit() else p for p in m.group(1).split(".")]
            message = m.group(2)
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        pos = position_of(positions, loc)
        out.append(
            ConfigProblem(
                file, pos.line if pos else None, pos.column if pos else None, ".".join(str(p) for p in loc), message
            )
        )
    return out


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a config file; None gives the built-in defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # bounded: the path may be /dev/zero or a FIFO
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(str(p), None, None, "", f"cannot read: {exc}")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigProblem(str(p), None, None, "", f"larger than {MAX_CONFIG_BYTES} bytes")])
    return parse_config(text, str(p))
