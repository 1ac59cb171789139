"""Operator commands that talk to the running daemon over its HTTP API.

    sentinel status                 GPUs, workers (profile and state), firing alerts, recent actions
    sentinel history [--limit N]    the remediation journal
    sentinel pause [WORKER]         stop remediation on one worker, or on all
    sentinel resume [WORKER]        act again (also clears needs_human)

The daemon's address comes from `--url`, else from the config's `listen`
(`-c`, else $SENTINEL_CONFIG, else /etc/sentinel/sentinel.yaml when it exists).
pause and resume send the control token, read from `--token-file`, else
$SENTINEL_TOKEN_FILE, else the config's `control.token_file`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sentinel.config.models import DEFAULT_LISTEN, Config, ConfigError, load_config, split_listen

__all__ = ["COMMANDS", "build_parser", "format_table", "main"]

COMMANDS = ("status", "history", "pause", "resume")
DEFAULT_CONFIG = "/etc/sentinel/sentinel.yaml"
MAX_CELL = 72


class OpsError(Exception):
    """A failure to report in one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- plumbing ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentinel", description="Talk to a running Sentinel.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the daemon's base URL (default: from the config's listen)")
    common.add_argument("-c", "--config", help="sentinel.yaml (default: $SENTINEL_CONFIG or " + DEFAULT_CONFIG + ")")
    common.add_argument("--token-file", help="control token file (default: $SENTINEL_TOKEN_FILE or control.token_file)")
    common.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[common], help="GPUs, workers, firing alerts and recent actions")
    history = sub.add_parser("history", parents=[common], help="the remediation journal, newest first")
    history.add_argument("--limit", type=int, default=20, help="rows to show (default 20)")
    history.add_argument("--worker", help="only this worker's rows")
    for verb, text in (("pause", "stop remediation"), ("resume", "resume remediation (clears needs_human)")):
        cmd = sub.add_parser(verb, parents=[common], help=f"{text} on WORKER, or on every worker")
        cmd.add_argument("worker", nargs="?", metavar="WORKER")
    return parser


def _config(path: str | None) -> Config | None:
    candidate = path or os.environ.get("SENTINEL_CONFIG") or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None)
    if candidate is None:
        return None
    try:
        return load_config(candidate)
    except ConfigError as exc:
        raise OpsError(f"invalid config {candidate}:\n{exc}", 2) from None


def _base_url(args: argparse.Namespace, config: Config | None) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    host, port = split_listen(config.listen if config else DEFAULT_LISTEN)
    # A wildcard bind is reached on loopback from this host.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _token(args: argparse.Namespace, config: Config | None) -> str:
    path = args.token_file or os.environ.get("SENTINEL_TOKEN_FILE") or (config.control.token_file if config else None)
    if not path:
        raise OpsError("no control token: give --token-file, set $SENTINEL_TOKEN_FILE, or set control.token_file", 2)
    path = os.path.expandvars(path)
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise OpsError(f"cannot read the control token file {path}: {exc}", 2) from None
    if not token:
        raise OpsError(f"the control token file {path} is empty", 2)
    return token


class Client:
    """A tiny JSON client for the daemon's API (blocking: this is a command, not the daemon)."""

    def __init__(self, base: str, timeout: float, token: str | None = None) -> None:
        self.base = base
        self.timeout = timeout
        self._token = token

    def get(self, path: str, **query: Any) -> Any:
        params = {k: v for k, v in query.items() if v is not None}
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        return self._call(urllib.request.Request(url, method="GET"))

    def post(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path, data=b"", method="POST")
        if self._token is not None:
            request.add_header("Authorization", f"Bearer {self._token}")
        return self._call(request)

    def _call(self, request: urllib.request.Request) -> Any:
        request.add_header("Accept", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            where = f"{request.get_method()} {request.full_url}"
            raise OpsError(f"{where}: HTTP {exc.code}: {_server_error(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise OpsError(f"cannot reach Sentinel at {self.base} ({reason}); is it running? (--url)", 2) from None
        try:
            payload = json.loads(body)
        except ValueError:
            raise OpsError(f"{request.full_url}: the answer is not JSON") from None
        if not isinstance(payload, dict) or payload.get("status") != "success":
            raise OpsError(f"{request.full_url}: {payload.get('error') if isinstance(payload, dict) else payload}")
        return payload.get("data")


def _server_error(exc: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(exc.read())
    except (ValueError, OSError):
        return str(exc.reason)
    if isinstance(payload, dict) and payload.get("error"):
        return str(payload["error"])
    return str(exc.reason)


# -- formatting -------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], empty: str = "(none)") -> str:
    """Left-aligned columns, two spaces apart; long cells are cut with an ellipsis."""
    cells = [[_cell(v) for v in row] for row in rows]
    if not cells:
        return "  " + empty
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    text = "-" if value is None or value == "" else str(value).replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, now - ts)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _stamp(ts: float | None) -> str:
    return "-" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _number(value: Any, unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{float(value) * scale:.{digits}f}{unit}"


def _gpus_table(gpus: list[dict[str, Any]]) -> str:
    rows = [
        (
            g.get("index"),
            "up" if g.get("up") else "LOST",
            _number(g.get("utilization"), "%", 100),
            _number(g.get("memory_used_bytes"), " GiB", 2**-30, 1),
            _number(g.get("temperature_celsius"), "C"),
            _number(g.get("power_watts"), " W"),
            g.get("name"),
            g.get("problem"),
        )
        for g in gpus
    ]
    headers = ("GPU", "STATE", "UTIL", "MEM USED", "TEMP", "POWER", "NAME", "PROBLEM")
    return format_table(headers, rows, "(no GPUs seen)")


def _workers_table(workers: list[dict[str, Any]], now: float, ladder_steps: int | None = None) -> str:
    rows = []
    for w in workers:
        profiles = w.get("profiles") or []
        profile = w.get("profile", "-")
        if len(profiles) > 1:
            profile = f"{profile} ({int(w.get('profile_index', 0)) + 1}/{len(profiles)})"
        flight = w.get("in_flight")
        in_flight = f"{flight['action']} ({flight.get('phase', 'acting')}, {flight['seconds']:.0f}s)" if flight else "-"
        last = w.get("last_action")
        last_text = f"{last['action']} {last['outcome']} {_ago(last.get('at'), now)}" if last else "-"
        state = w.get("state", "-")
        if w.get("needs_human") and w.get("needs_human_reason"):
            state = f"{state}: {w['needs_human_reason']}"
        ladder = w.get("escalation")
        if ladder_steps:
            ladder = f"{ladder}/{ladder_steps}"
        rows.append((w.get("name"), state, profile, w.get("unit"), in_flight, ladder, last_text))
    return format_table(
        ("WORKER", "STATE", "PROFILE", "UNIT", "IN FLIGHT", "LADDER", "LAST ACTION"), rows, "(no workers configured)"
    )


def _alerts_table(alerts: list[dict[str, Any]], now: float) -> str:
    rows = []
    for a in alerts:
        if a.get("state") != "firing":
            continue
        labels = a.get("labels", {})
        where = labels.get("worker") or (f"gpu {labels['gpu']}" if "gpu" in labels else "-")
        since = _parse_rfc3339(a.get("activeAt"))
        summary = a.get("annotations", {}).get("summary", "")
        rows.append((labels.get("alertname"), labels.get("severity"), where, _ago(since, now), summary))
    return format_table(("ALERT", "SEVERITY", "WHERE", "SINCE", "SUMMARY"), rows, "(no alerts firing)")


def _parse_rfc3339(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _profile_change(row: dict[str, Any]) -> str:
    before, after = row.get("profile_before") or "", row.get("profile_after") or ""
    return before if before == after else f"{before or '?'} -> {after or '?'}"


def _actions_table(rows: list[dict[str, Any]], *, wide: bool) -> str:
    body: list[tuple[object, ...]]
    if wide:
        headers: tuple[str, ...] = (
            "ID",
            "STARTED",
            "WORKER",
            "ACTION",
            "MODE",
            "TRIGGER",
            "OUTCOME",
            "PROFILE",
            "ALERT",
            "HEALTHY IN",
            "DETAIL",
        )
        body = [
            (
                r.get("id"),
                _stamp(r.get("started")),
                r.get("worker"),
                r.get("action"),
                r.get("mode"),
                r.get("trigger"),
                _outcome(r),
                _profile_change(r),
                r.get("alertname"),
                _number(r.get("seconds_to_healthy"), "s", 1, 1),
                r.get("error"),
            )
            for r in rows
        ]
    else:
        headers = ("STARTED", "WORKER", "ACTION", "OUTCOME", "PROFILE", "ALERT", "DETAIL")
        body = [
            (
                _stamp(r.get("started")),
                r.get("worker"),
                r.get("action"),
                _outcome(r),
                _profile_change(r),
                r.get("alertname"),
                r.get("error"),
            )
            for r in rows
        ]
    return format_table(headers, body, "(no actions journaled)")


def _outcome(row: dict[str, Any]) -> str:
    outcome = row.get("outcome") or "in flight"
    if row.get("verify"):
        outcome += f" (re-verify {row['verify']})"
    return str(outcome)


# -- commands ---------------------------------------------------------------------------


def _status(client: Client, out: TextIO) -> None:
    now = time.time()
    remediation = client.get("/api/v1/workers")
    gpus, gpus_error = _optional(client, "/api/v1/gpus")
    alerts, alerts_error = _optional(client, "/api/v1/alerts")
    actions = client.get("/api/v1/actions", limit=10)
    flags = [f"{remediation['mode']} mode", f"{remediation['in_flight']} action(s) in flight"]
    if remediation.get("paused"):
        flags.append("PAUSED on all workers")
    if remediation.get("circuit_breaker_open"):
        flags.append("CIRCUIT BREAKER OPEN")
    out.write(f"Sentinel at {client.base}; remediation: {', '.join(flags)}\n\n")
    out.write("GPUs\n" + (gpus_error or _gpus_table(gpus or [])) + "\n\n")
    workers = _workers_table(remediation["workers"], now, remediation.get("ladder_steps"))
    out.write("Workers\n" + workers + "\n\n")
    firing = (alerts or {}).get("alerts", [])
    out.write("Firing alerts\n" + (alerts_error or _alerts_table(firing, now)) + "\n\n")
    out.write("Recent actions\n" + _actions_table(actions, wide=False) + "\n")


def _optional(client: Client, path: str) -> tuple[Any, str]:
    """A section of the status that may be missing (no NVML, no rules): (data, why not)."""
    try:
        return client.get(path), ""
    except OpsError as exc:
        if exc.code == 2:  # the daemon itself is unreachable: no point going on
            raise
        return None, f"  (unavailable: {exc})"


def _history(client: Client, out: TextIO, limit: int, worker: str | None) -> None:
    rows = client.get("/api/v1/actions", limit=limit, worker=worker)
    out.write(_actions_table(rows, wide=True) + "\n")


def _switch(client: Client, out: TextIO, verb: str, worker: str | None) -> None:
    path = f"/api/v1/workers/{urllib.parse.quote(worker, safe='')}/{verb}" if worker else f"/api/v1/{verb}"
    data = client.post(path)
    what = f"worker {worker}" if worker else "all workers"
    out.write(f"{'paused' if verb == 'pause' else 'resumed'} remediation on {what}\n\n")
    out.write(_workers_table(data["workers"], time.time(), data.get("ladder_steps")) + "\n")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one of COMMANDS (argv starts with its name); returns the exit status."""
    out = out or sys.stdout
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = None if args.url and args.command in ("status", "history") else _config(args.config)
        token = _token(args, config) if args.command in ("pause", "resume") else None
        client = Client(_base_url(args, config), args.timeout, token)
        if args.command == "status":
            _status(client, out)
        elif args.command == "history":
            if not 1 <= args.limit <= 1000:
                raise OpsError("--limit: expected 1 to 1000", 2)
            _history(client, out, args.limit, args.worker)
        else:
            _switch(client, out, args.command, args.worker)
    except OpsError as exc:
        print(f"sentinel {args.command}: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
