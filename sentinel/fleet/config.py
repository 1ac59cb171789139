"""The `fleet:` section of sentinel.yaml: how this host joins a fleet coordinated on etcd.

Validated once into frozen models like the rest of the configuration. Cross-field rules
(two heads in a group, a member named twice, a percentage over 100 %) fail here with a
message that names the field; `check_against_workers` adds the checks that need this
host's `workers:` list, for the main configuration loader to call.

An example, with every policy spelled out:

    fleet:
      endpoints: [https://etcd-1:2379, https://etcd-2:2379, https://etcd-3:2379]
      tls: {ca_file: /etc/sentinel/etcd-ca.pem, cert_file: /etc/sentinel/etcd.pem, key_file: /etc/sentinel/etcd-key.pem}
      user: sentinel
      password_file: /etc/sentinel/etcd-password
      name: prod-inference          # key prefix: /sentinel/prod-inference/
      lease_ttl: 10s
      partition_policy: hold        # hold | local
      budget:
        max_unavailable: 10%        # of the workers on live hosts; or a count such as 2
        per_label: [{label: model, max_unavailable: 1}]
      breaker: {share: 0.5, window: 5m, min_hosts: 3}
      groups:
        - name: qwen3-480b
          members:
            - {member: host-a:qwen3-r0, head: true}
            - {member: host-b:qwen3-r1}
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from sentinel.config.base import Duration, Frozen

__all__ = [
    "BreakerConfig",
    "BudgetConfig",
    "FleetConfig",
    "FleetTLS",
    "GroupConfig",
    "GroupMember",
    "LabelBudget",
    "MaxUnavailable",
    "check_against_workers",
    "parse_max_unavailable",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def _check_name(value: str, what: str) -> str:
    """Names end up inside etcd keys: keep them to a safe alphabet, no slashes."""
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r} must be 1-63 characters of letters, digits, '.', '_' or '-'")
    return value


class MaxUnavailable(Frozen):
    """A disruption budget: a fixed count of workers, or a percentage of the live ones."""

    count: int | None = None
    percent: float | None = None

    def limit(self, live_workers: int) -> int:
        """Slots allowed now; a percentage rounds up, like a Kubernetes PodDisruptionBudget's."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return math.ceil(live_workers * self.percent / 100.0 - 1e-9)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


def parse_max_unavailable(value: object) -> object:
    """`2` (a count) or `"25%"` (a share of live workers) into a MaxUnavailable."""
    if isinstance(value, (MaxUnavailable, dict)):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a count such as 2 or a percentage such as '25%', not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"max_unavailable cannot be negative (got {value})")
        return {"count": value}
    if isinstance(value, str):
        if value.strip().isdigit():
            return {"count": int(value.strip())}
        m = _PERCENT.match(value)
        if m is None:
            raise ValueError(
                f"invalid max_unavailable {value!r}: expected a count such as 2 or a percentage such as '25%'"
            )
        percent = float(m.group(1))
        if not 0 < percent <= 100:
            raise ValueError(f"max_unavailable {value!r} must be a percentage above 0% and at most 100%")
        return {"percent": percent}
    raise ValueError(f"invalid max_unavailable {value!r}: expected a count such as 2 or a percentage such as '25%'")


MaxUnavailableField = Annotated[MaxUnavailable, BeforeValidator(parse_max_unavailable)]


class FleetTLS(Frozen):
    """Client TLS towards etcd: the CA that signed the members' certificates, and an
    optional client certificate for etcd's `--client-cert-auth`."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> FleetTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: give both or neither")
        return self


class LabelBudget(Frozen):
    """A budget per value of one worker label (e.g. one restart at a time per model)."""

    label: str
    max_unavailable: MaxUnavailableField

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value):
            raise ValueError(f"label {value!r} is not a valid label name")
        return value


class BudgetConfig(Frozen):
    """The fleet disruption budget: how many workers may be disrupted at once."""

    max_unavailable: MaxUnavailableField = Field(
        default_factory=lambda: MaxUnavailable(count=1),
        description="Disruptive actions in flight across the fleet: a count, or a percentage of live workers.",
    )
    per_label: tuple[LabelBudget, ...] = ()
    wait: Duration = Field(60.0, ge=0, description="How long an action waits for a slot before it is refused.")

    @model_validator(mode="after")
    def _unique_labels(self) -> BudgetConfig:
        seen = [b.label for b in self.per_label]
        dupes = sorted({x for x in seen if seen.count(x) > 1})
        if dupes:
            raise ValueError(f"per_label names label {dupes[0]!r} twice")
        return self


class BreakerConfig(Frozen):
    """The fleet breaker: the same alert on too many hosts at once is systemic."""

    share: float = Field(0.5, gt=0, le=1, description="Trips when more than this share of live hosts fire the alert.")
    window: Duration = Field(300.0, gt=0, description="Hosts count when the alert started within this window.")
    min_hosts: int = Field(3, ge=2, description="Never trips on fewer hosts than this.")


class GroupMember(Frozen):
    member: str = Field(description="host:worker")
    head: bool = False

    @field_validator("member")
    @classmethod
    def _member(cls, value: str) -> str:
        host, sep, worker = value.partition(":")
        if not sep or not host or not worker:
            raise ValueError(f"member {value!r} must be written host:worker")
        _check_name(host, "host")
        _check_name(worker, "worker")
        return value

    @property
    def host(self) -> str:
        return self.member.partition(":")[0]

    @property
    def worker(self) -> str:
        return self.member.partition(":")[2]


class GroupConfig(Frozen):
    """A serving group spanning hosts: restarted as one, head first, then the rest in order."""

    name: str
    members: tuple[GroupMember, ...] = Field(min_length=2)
    labels: dict[str, str] = Field(default_factory=dict, description="Labels for the group's budget slot.")
    step_timeout: Duration = Field(120.0, gt=0, description="A member must confirm each step within this time.")
    verify_timeout: Duration = Field(300.0, gt=0, description="Time for the verify step (the head must serve).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "group name")

    @model_validator(mode="after")
    def _one_head(self) -> GroupConfig:
        heads = [m.member for m in self.members if m.head]
        if len(heads) != 1:
            found = ", ".join(heads) if heads else "none"
            raise ValueError(f"group {self.name!r} needs exactly one member with head: true (found {found})")
        names = [m.member for m in self.members]
        dupes = sorted({x for x in names if names.count(x) > 1})
        if dupes:
            raise ValueError(f"group {self.name!r} names member {dupes[0]!r} twice")
        return self

    @property
    def head(self) -> GroupMember:
        return next(m for m in self.members if m.head)

    def start_order(self) -> list[GroupMember]:
        """The head, then the others in the order written."""
        return [self.head, *(m for m in self.members if not m.head)]


class FleetConfig(Frozen):
    """How this Sentinel joins the fleet. Absent: the host heals alone, as before."""

    endpoints: tuple[str, ...] = Field(min_length=1, description="etcd client URLs (http:// or https://).")
    tls: FleetTLS | None = None
    user: str | None = None
    password_file: Path | None = None
    name: str = Field("default", description="Fleet name: every key lives under /sentinel/<name>/.")
    host_id: str = Field(default_factory=socket.gethostname, description="This host's id in the fleet.")
    lease_ttl: Duration = Field(10.0, ge=2, le=300, description="A host whose lease lapses this long is down.")
    request_timeout: Duration = Field(2.0, gt=0, le=60, description="Deadline for each etcd call.")
    status_interval: Duration = Field(5.0, gt=0, description="How often this host's status is re-read.")
    partition_policy: Literal["hold", "local"] = Field(
        "hold", description="Without etcd: `hold` refuses disruptive actions, `local` allows them under local limits."
    )
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    groups: tuple[GroupConfig, ...] = ()

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not re.match(r"^https?://[^/\s]+(:\d+)?/?$", url):
                raise ValueError(f"endpoint {url!r} must be a URL like http://10.0.0.5:2379 or https://etcd-1:2379")
        if len(set(value)) != len(value):
            raise ValueError("an endpoint is listed twice")
        return tuple(u.rstrip("/") for u in value)

    @field_validator("name")
    @classmethod
    def _fleet_name(cls, value: str) -> str:
        return _check_name(value, "fleet name")

    @field_validator("host_id")
    @classmethod
    def _host(cls, value: str) -> str:
        return _check_name(value, "host_id")

    @model_validator(mode="after")
    def _cross(self) -> FleetConfig:
        if (self.user is None) != (self.password_file is None):
            raise ValueError("user and password_file go together: give both or neither")
        uses_tls = any(u.startswith("https://") for u in self.endpoints)
        if self.tls is not None and not uses_tls:
            raise ValueError("tls is set but no endpoint is https://")
        if uses_tls and not all(u.startswith("https://") for u in self.endpoints):
            raise ValueError("mix of http:// and https:// endpoints: use one scheme for the whole cluster")
        names = [g.name for g in self.groups]
        dupes = sorted({x for x in names if names.count(x) > 1})
        if dupes:
            raise ValueError(f"group {dupes[0]!r} is defined twice")
        owner: dict[str, str] = {}
        for group in self.groups:
            for m in group.members:
                if m.member in owner:
                    raise ValueError(f"member {m.member!r} is in groups {owner[m.member]!r} and {group.name!r}")
                owner[m.member] = group.name
        return self

    @property
    def prefix(self) -> str:
        return f"/sentinel/{self.name}/"

    def groups_of_host(self, host: str) -> list[GroupConfig]:
        return [g for g in self.groups if any(m.host == host for m in g.members)]

    def group_of(self, host: str, worker: str) -> GroupConfig | None:
        """The serving group a local worker belongs to, if any."""
        member = f"{host}:{worker}"
        return next((g for g in self.groups if any(m.member == member for m in g.members)), None)


def check_against_workers(fleet: FleetConfig, host_id: str, worker_names: Iterable[str]) -> list[str]:
    """Problems between `fleet.groups` and this host's `workers:` (empty when consistent).

    Each message names the field path, for the main loader to report with file:line.
    """
    known = set(worker_names)
    problems = []
    for gi, group in enumerate(fleet.groups):
        for mi, m in enumerate(group.members):
            if m.host == host_id and m.worker not in known:
                listed = ", ".join(sorted(known)) or "none"
                problems.append(
                    f"fleet.groups.{gi}.members.{mi}.member: {m.member!r} is on this host ({host_id}) "
                    f"but no worker is named {m.worker!r} (workers: {listed})"
                )
    return problems
