"""`sentinel fleet ...`: read and steer the fleet straight from etcd, from any host.

    sentinel fleet status [--json]      every host, alive or not, like `kubectl get nodes`
    sentinel fleet resume ALERT         resume actions after an operator checked a breaker
    sentinel fleet forget HOST          drop a decommissioned host from the member list

Connection settings come from the `fleet:` section of sentinel.yaml (`-c`), or from
`--endpoints` and `--fleet` alone. No daemon needs to run on the host: the command
reads etcd in one transaction, so every section of the output is from one revision.

Exit status: 0 done, 1 etcd unreachable or refused, 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sentinel.config.yamlpos import YamlError, load_with_positions, position_of
from sentinel.fleet.breaker import BreakerRecord
from sentinel.fleet.budget import BudgetView, PoolState
from sentinel.fleet.config import FleetConfig
from sentinel.fleet.coordinator import FleetSetupError, build_client, read_secret
from sentinel.fleet.etcd import Compare, EtcdClient, EtcdError, KeyValue, PutOp, RangeOp
from sentinel.fleet.groups import GroupPlan, parse_plan
from sentinel.fleet.keys import Keys
from sentinel.fleet.status import HostStatus, MemberRecord
from sentinel.runtime.timeouts import wait_for

__all__ = ["FleetView", "add_arguments", "load_fleet_section", "main", "read_fleet", "render", "run"]

DEFAULT_CONFIG = "/etc/sentinel/sentinel.yaml"


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- configuration ---------------------------------------------------------------------------


def load_fleet_section(path: str | Path) -> FleetConfig:
    """The validated `fleet:` section of a sentinel.yaml, with file:line in errors."""
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"{file}: cannot read: {exc.strerror}", 2) from None
    try:
        data, positions = load_with_positions(text, file)
    except YamlError as exc:
        raise CliError(str(exc), 2) from None
    section = data.get("fleet") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise CliError(f"{file}: no fleet: section (it names the etcd endpoints)", 2)
    try:
        return FleetConfig.model_validate(section)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = ["fleet", *err["loc"]]
            pos = position_of(positions, loc)
            where = f"{file}:{pos.line}:{pos.column}" if pos else file
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {'.'.join(str(p) for p in loc)}: {message}")
        raise CliError("\n".join(lines), 2) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fleet` subcommands, for the main CLI to mount."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help=f"sentinel.yaml with a fleet: section (default {DEFAULT_CONFIG})")
    common.add_argument("--endpoints", help="etcd client URLs, comma-separated (instead of -c)")
    common.add_argument("--fleet", dest="fleet_name", help="fleet name (with --endpoints; default 'default')")
    common.add_argument("--timeout", type=float, default=5.0, help="seconds for the whole command (default 5)")
    sub = parser.add_subparsers(dest="fleet_command", required=True)
    status = sub.add_parser("status", parents=[common], help="every host, alive or not, with workers and alerts")
    status.add_argument("--json", action="store_true", help="one JSON object")
    resume = sub.add_parser("resume", parents=[common], help="resume actions on an alert the fleet breaker stopped")
    resume.add_argument("alert")
    forget = sub.add_parser("forget", parents=[common], help="drop a decommissioned host from the member list")
    forget.add_argument("host")


def _fleet_config(args: argparse.Namespace) -> FleetConfig:
    if args.endpoints:
        endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
        try:
            return FleetConfig(endpoints=tuple(endpoints), name=args.fleet_name or "default")
        except ValidationError as exc:
            raise CliError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()), 2) from None
    config = load_fleet_section(args.config or DEFAULT_CONFIG)
    if args.fleet_name:
        config = config.model_copy(update={"name": args.fleet_name})
    return config


# -- reading ---------------------------------------------------------------------------------


@dataclass
class HostRow:
    host: str
    status: str  # Ready, NotReady, Left
    leader: bool
    member: MemberRecord | None
    current: HostStatus | None

    @property
    def shown(self) -> HostStatus | None:
        return self.current or (self.member.last_status if self.member else None)


@dataclass
class FleetView:
    fleet: str
    revision: int
    read_at: float
    hosts: list[HostRow]
    leader: str | None
    pools: list[PoolState]
    breakers: list[BreakerRecord]
    groups: list[GroupPlan]
    group_locks: dict[str, dict[str, Any]] = field(default_factory=dict)


async def read_fleet(client: EtcdClient, config: FleetConfig, timeout: float) -> FleetView:
    keys = Keys(config.prefix)
    parts = [keys.hosts, keys.members, keys.election, keys.slots, keys.breakers, keys.groups]
    result = await client.txn([], [RangeOp(p, prefix=True) for p in parts], timeout=timeout)
    hosts_kv, members_kv, election_kv, slots_kv, breaker_kv, groups_kv = (result.range(i).kvs for i in range(6))
    current = {kv.key[len(keys.hosts) :]: s for kv in hosts_kv if (s := _model(HostStatus, kv)) is not None}
    members = {kv.key[len(keys.members) :]: m for kv in members_kv if (m := _model(MemberRecord, kv)) is not None}
    leader_kv = min(election_kv, key=lambda kv: kv.create_revision, default=None)
    leader = leader_kv.value.decode() if leader_kv is not None else None
    rows = []
    for host in sorted(set(current) | set(members)):
        member = members.get(host)
        if host in current:
            state = "Ready"
        elif member is not None and member.state == "left":
            state = "Left"
        else:
            state = "NotReady"
        rows.append(HostRow(host, state, host == leader, member, current.get(host)))
    view = BudgetView(keys, config.budget)
    pools = list(view.all_pools(slots_kv, list(current.values())).values())
    breakers = [b for kv in breaker_kv if (b := _model(BreakerRecord, kv)) is not None]
    plans = [p for kv in groups_kv if kv.key.endswith("/plan") and (p := parse_plan(kv)) is not None]
    locks = {kv.key.split("/")[-2]: (kv.json() or {}) for kv in groups_kv if kv.key.endswith("/lock")}
    return FleetView(config.name, result.revision, time.time(), rows, leader, pools, breakers, plans, locks)


def _model(model: type[Any], kv: KeyValue) -> Any:
    try:
        return model.model_validate_json(kv.value)
    except (ValidationError, ValueError):
        return None


# -- output ----------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    return f"{s // 86400}d"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def render(view: FleetView) -> str:
    now = view.read_at
    rows = [["HOST", "STATUS", "ROLE", "AGE", "VERSION", "GPUS", "WORKERS", "ALERTS"]]
    for r in view.hosts:
        s = r.shown
        since = r.member.since if r.member and r.status != "Ready" else None
        status = r.status + (f" ({_age(now - since)})" if since else "")
        joined = r.member.joined_at if r.member else (s.started_at if s else now)
        gpus = f"{s.gpus_up}/{s.gpus_expected}" if s and s.gpus_up is not None else "-"
        workers = (
            ",".join(f"{w.name}={w.state}" + (f"({w.profile})" if w.profile else "") for w in s.workers) if s else ""
        )
        human = [w.name for w in s.workers if w.needs_human] if s else []
        alerts = ",".join(sorted({a.name for a in s.alerts})) if s else ""
        if human:
            alerts = (alerts + "," if alerts else "") + "needs_human:" + "+".join(human)
        role = "leader" if r.leader else "-"
        rows.append(
            [
                r.host,
                status,
                role,
                _age(now - joined),
                (s.version if s else "") or "-",
                gpus,
                workers or "-",
                alerts or "-",
            ]
        )
    out = [f"fleet {view.fleet} (etcd revision {view.revision})", _table(rows)]
    budget = [["POOL", "HELD", "LIMIT", "WAITING", "HOLDERS"]]
    for p in view.pools:
        holders = ", ".join(f"{h.host}/{h.worker} {h.action} {_age(now - h.at)}" for h in p.holders) or "-"
        budget.append([p.name, str(p.held), str(p.limit), str(p.waiting), holders])
    out += ["", "disruption budget", _table(budget)]
    if view.breakers:
        br = [["ALERT", "STATE", "SINCE", "HOSTS"]]
        for b in view.breakers:
            br.append([b.alert, b.state, _age(now - (b.resumed_at or b.opened_at)), ",".join(b.hosts)])
        out += ["", "fleet breaker", _table(br)]
    if view.groups:
        gr = [["GROUP", "PHASE", "ACTION", "STEP", "INITIATOR", "AGE", "FAILURE"]]
        for g in view.groups:
            step = f"{g.current + 1}/{len(g.steps)} {g.steps[g.current].kind}" if 0 <= g.current < len(g.steps) else "-"
            gr.append([g.group, g.phase, g.action, step, g.initiator, _age(now - g.created_at), g.failure or "-"])
        out += ["", "serving groups", _table(gr)]
    return "\n".join(out)


def as_json(view: FleetView) -> dict[str, Any]:
    def host(r: HostRow) -> dict[str, Any]:
        s = r.shown
        return {
            "host": r.host,
            "status": r.status,
            "leader": r.leader,
            "since": r.member.since if r.member else None,
            "joined_at": r.member.joined_at if r.member else None,
            "live": r.current is not None,
            "version": s.version if s else None,
            "gpus_up": s.gpus_up if s else None,
            "gpus_expected": s.gpus_expected if s else None,
            "workers": [w.model_dump() for w in s.workers] if s else [],
            "alerts": [a.model_dump() for a in s.alerts] if s else [],
            "needs_human": s.needs_human if s else [],
        }

    return {
        "fleet": view.fleet,
        "revision": view.revision,
        "leader": view.leader,
        "hosts": [host(r) for r in view.hosts],
        "budget": [
            {
                "pool": p.name,
                "held": p.held,
                "limit": p.limit,
                "waiting": p.waiting,
                "holders": [h.model_dump() for h in p.holders],
            }
            for p in view.pools
        ],
        "breakers": [b.model_dump() for b in view.breakers],
        "groups": [g.model_dump() for g in view.groups],
    }


# -- commands --------------------------------------------------------------------------------


async def _run(args: argparse.Namespace, config: FleetConfig) -> int:
    password = await asyncio.to_thread(read_secret, config.password_file) if config.password_file else None
    client = await asyncio.to_thread(build_client, config, password)
    keys = Keys(config.prefix)
    try:
        if args.fleet_command == "status":
            view = await read_fleet(client, config, args.timeout)
            print(json.dumps(as_json(view), indent=2) if args.json else render(view))
            return 0
        if args.fleet_command == "resume":
            key = keys.breaker(args.alert)
            kv = await client.get(key, timeout=args.timeout)
            record = _model(BreakerRecord, kv) if kv is not None else None
            if record is None:
                print(f"no fleet breaker for {args.alert}: nothing to resume", file=sys.stderr)
                return 1
            user = _user()
            resumed = record.model_copy(update={"state": "resumed", "resumed_at": time.time(), "resumed_by": user})
            ok = await _cas(client, key, kv, resumed.model_dump_json().encode(), args.timeout)
            print(f"resumed {args.alert}: hosts act on it again" if ok else "changed meanwhile: try again")
            return 0 if ok else 1
        if args.fleet_command == "forget":
            live = await client.get(keys.host(args.host), timeout=args.timeout)
            if live is not None:
                print(f"{args.host} is alive (its lease holds): stop its Sentinel first", file=sys.stderr)
                return 1
            deleted = await client.delete(keys.member(args.host), timeout=args.timeout)
            print(f"forgot {args.host}" if deleted else f"{args.host} is not a member")
            return 0 if deleted else 1
        raise CliError(f"unknown fleet command {args.fleet_command}", 2)
    finally:
        await client.close()


async def _cas(client: EtcdClient, key: str, kv: KeyValue | None, value: bytes, timeout: float) -> bool:
    mod = kv.mod_revision if kv is not None else 0
    result = await client.txn([Compare(key, "mod", "=", mod)], [PutOp(key, value)], timeout=timeout)
    return result.succeeded


def _user() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "unknown"


def run(args: argparse.Namespace, config: FleetConfig | None = None) -> int:
    """Run a parsed `fleet` command; `config` when the caller already loaded sentinel.yaml."""
    try:
        fleet = config if config is not None and not args.endpoints else _fleet_config(args)
        return asyncio.run(wait_for(_run(args, fleet), args.timeout + 1))
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except FleetSetupError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (EtcdError, asyncio.TimeoutError) as exc:
        print(f"cannot read the fleet from etcd: {exc or 'timed out'}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """`sentinel fleet ARGS...` (argv without the leading 'fleet')."""
    parser = argparse.ArgumentParser(prog="sentinel fleet", description="The fleet, read from etcd.")
    add_arguments(parser)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
