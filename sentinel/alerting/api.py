"""Prometheus-shaped HTTP API over the local store and rules.

`/api/v1/query`, `/api/v1/query_range`, `/api/v1/rules` and `/api/v1/alerts` answer in
the same JSON shapes as Prometheus, so Grafana's Prometheus data source, amtool-style
scripts and curl habits work against a single host's Sentinel, at 1 s resolution.

Queries and metadata lookups run on the `QueryRunner`'s own bounded pool with a
deadline, a sample limit and cancellation when the client leaves; the JSON answer is
built there too, one series at a time, so no query stalls the event loop. Bad input
(a time or step out of range, a query over the text limits of `promql.guard`) is a
400 with Prometheus's `bad_data` body, never a 500.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from aiohttp import web

from sentinel.alerting.manager import RuleManager
from sentinel.alerting.rulefile import parse_prom_duration
from sentinel.alerting.state import Alert, AlertState
from sentinel.promql import Engine, Matrix, PromQLError, Scalar, String, Vector, parse
from sentinel.promql.budget import QueryBudget
from sentinel.promql.runner import QueryRunner
from sentinel.promql.syntax import Node, Selector
from sentinel.store import Matcher, Series, Store, now_ms

__all__ = ["prometheus_api_routes"]

log = logging.getLogger(__name__)

MAX_POINTS = 11_000  # Prometheus refuses range queries above this many points per series

MAX_TIME_S = 1e13
"""Largest |time| accepted, in seconds (year ~318,000): beyond it times overflow int64 milliseconds."""


def _format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    v = float(v)
    # Go's JSON float format, as Prometheus writes it: positional between 1e-6 and 1e21.
    if v != 0 and (abs(v) < 1e-6 or abs(v) >= 1e21):
        return repr(v)
    return format(Decimal(repr(v)).normalize(), "f")


def _rfc3339(ms: int | None) -> str:
    if ms is None:
        return "0001-01-01T00:00:00Z"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(text: str | None, default_ms: int | None) -> int | None:
    if text is None or text == "":
        return default_ms
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            if abs(seconds) > MAX_TIME_S:
                raise ValueError(f'cannot parse "{text}" to a valid timestamp: out of range')
            return round(seconds * 1000)
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        raise ValueError(f'cannot parse "{text[:64]}" to a valid timestamp') from None


def _parse_step(text: str | None) -> int:
    if not text:
        raise ValueError("missing step")
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parse_prom_duration(text) / 1000
        except (ValueError, OverflowError):
            raise ValueError(f'cannot parse "{text[:64]}" to a valid duration') from None
    if not seconds > 0:
        raise ValueError("zero or negative query resolution step widths are not accepted. Try a positive integer")
    if not math.isfinite(seconds) or seconds > MAX_TIME_S:
        raise ValueError(f'cannot parse "{text[:64]}" to a valid duration: out of range')
    if seconds < 0.001:
        raise ValueError("query resolution step widths below 1ms are not accepted")
    return round(seconds * 1000)


class _BadQuery(Exception):
    """The query text does not parse: the client's error (400 bad_data), as Prometheus answers it."""


def _parse_query(engine: Engine, expr: str) -> Node:
    """`expr` parsed (in the query pool: the parser can take 0.1 s), or _BadQuery."""
    try:
        return engine.parse(expr)
    except (PromQLError, ValueError, OverflowError) as exc:  # `up @ 1e19` fails in conversion
        raise _BadQuery(f'invalid parameter "query": {exc}') from None


# Prometheus's status for each way a query can fail while running.
_BUDGET_STATUS = {
    "query timed out in query execution": (503, "timeout"),
    "query timed out in query queue": (503, "timeout"),
    "query was canceled in query execution": (503, "canceled"),
}


def _execution_error(expr: str, exc: Exception) -> web.Response:
    """An evaluation error: 422 execution (503 for timeouts), never a bare 500 without the JSON body."""
    if not isinstance(exc, PromQLError):
        log.warning("query %.200r failed unexpectedly: %r", expr, exc)
    status, kind = _BUDGET_STATUS.get(str(exc), (422, "execution"))
    return _error(status, kind, str(exc) or type(exc).__name__)


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"status": "error", "errorType": kind, "error": message}, status=status)


def _success(data: Any) -> web.Response:
    return web.json_response({"status": "success", "data": data})


async def _params(request: web.Request) -> dict[str, str]:
    params = dict(request.query)
    if request.method == "POST":
        form = await request.post()
        params.update({k: str(v) for k, v in form.items()})
    return params


async def _match_params(request: web.Request) -> list[tuple[Matcher, ...]]:
    """Every `match[]` selector (query string and form) as matcher sets; raises ValueError."""
    texts = list(request.query.getall("match[]", []))
    if request.method == "POST":
        form = await request.post()
        texts += [str(v) for v in form.getall("match[]", [])]
    out: list[tuple[Matcher, ...]] = []
    for text in texts:
        try:
            node = parse(text)
        except PromQLError as exc:
            raise ValueError(f'invalid parameter "match[]": {exc}') from None
        if not isinstance(node, Selector):
            raise ValueError(f'invalid parameter "match[]": {text!r} is not a series selector')
        out.extend(node.alternatives)
    return out


def _metric(labels: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return dict(labels)


def _result_body(value: Any, t_ms: int, budget: QueryBudget) -> bytes:
    """The success response for `value`, encoded one series at a time.

    Each `json.dumps` call holds the GIL; a big matrix encoded in one call would stall
    the event loop for its whole length, so series are encoded separately (and the
    budget checked between them).
    """
    if not isinstance(value, Matrix):
        return json.dumps({"status": "success", "data": _result_json(value, t_ms)}).encode()
    parts = [b'{"status":"success","data":{"resultType":"matrix","result":[']
    for i, s in enumerate(value):
        if i:
            parts.append(b",")
            if i % 64 == 0:
                budget.check()
        values = [[ts / 1000, _format_value(v)] for ts, v in zip(s.timestamps, s.values, strict=True)]
        parts.append(json.dumps({"metric": _metric(s.labels), "values": values}).encode())
    parts.append(b"]}}")
    return b"".join(parts)


def _result_json(value: Any, t_ms: int) -> dict[str, Any]:
    t = t_ms / 1000
    if isinstance(value, Vector):
        return {
            "resultType": "vector",
            "result": [{"metric": _metric(s.labels), "value": [t, _format_value(s.value)]} for s in value],
        }
    if isinstance(value, Scalar):
        return {"resultType": "scalar", "result": [t, _format_value(value.value)]}
    if isinstance(value, String):
        return {"resultType": "string", "result": [t, value.value]}
    if isinstance(value, Matrix):
        return {
            "resultType": "matrix",
            "result": [
                {
                    "metric": _metric(s.labels),
                    "values": [[ts / 1000, _format_value(v)] for ts, v in zip(s.timestamps, s.values, strict=True)],
                }
                for s in value
            ],
        }
    raise TypeError(type(value))


def _alert_json(alert: Alert) -> dict[str, Any]:
    out: dict[str, Any] = {
        "labels": alert.labels,
        "annotations": alert.annotations,
        "state": alert.state.value,
        "activeAt": _rfc3339(alert.active_at_ms),
        "value": _format_value(alert.value),
    }
    if alert.keep_firing_since_ms is not None:
        out["keepFiringSince"] = _rfc3339(alert.keep_firing_since_ms)
    return out


def _client_gone(request: web.Request) -> Callable[[], bool]:
    """Whether the request's client has closed its connection."""

    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return gone


def prometheus_api_routes(
    engine_fn: Callable[[], Engine],
    rules_fn: Callable[[], RuleManager | None],
    runner: QueryRunner | None = None,
) -> list[web.RouteDef]:
    """Routes for the daemon's server; the callables see the current engine and rules after a reload.

    Queries run on `runner` (the daemon's, which it closes at exit); without one, a
    runner with the default limits.
    """
    queries = runner or QueryRunner()

    async def run_query(request: web.Request, expr: str, work: Callable[[QueryBudget], bytes]) -> web.Response:
        try:
            body = await queries.run(work, disconnected=_client_gone(request))
        except _BadQuery as exc:
            return _error(400, "bad_data", str(exc))
        except Exception as exc:
            return _execution_error(expr, exc)
        return web.Response(body=body, content_type="application/json")

    async def query(request: web.Request) -> web.Response:
        params = await _params(request)
        expr = params.get("query")
        if not expr:
            return _error(400, "bad_data", 'invalid parameter "query": missing query')
        try:
            t = _parse_time(params.get("time"), now_ms())
        except ValueError as exc:
            return _error(400, "bad_data", f'invalid parameter "time": {exc}')
        assert t is not None
        engine = engine_fn()

        def work(budget: QueryBudget) -> bytes:
            value = engine.instant_query(_parse_query(engine, expr), t, budget=budget).value
            return _result_body(value, t, budget)

        return await run_query(request, expr, work)

    async def query_range(request: web.Request) -> web.Response:
        params = await _params(request)
        expr = params.get("query")
        if not expr:
            return _error(400, "bad_data", 'invalid parameter "query": missing query')
        try:
            start = _parse_time(params.get("start"), None)
            end = _parse_time(params.get("end"), None)
            step = _parse_step(params.get("step"))
        except ValueError as exc:
            return _error(400, "bad_data", str(exc))
        if start is None or end is None:
            return _error(400, "bad_data", 'invalid parameter "start"/"end": missing')
        if end < start:
            return _error(400, "bad_data", "end timestamp must not be before start time")
        if (end - start) // step > MAX_POINTS:
            return _error(
                400,
                "bad_data",
                "exceeded maximum resolution of 11,000 points per timeseries. "
                "Try decreasing the query resolution (?step=XX)",
            )
        engine = engine_fn()

        def work(budget: QueryBudget) -> bytes:
            value = engine.range_query(_parse_query(engine, expr), start, end, step, budget=budget).value
            return _result_body(value, end, budget)

        return await run_query(request, expr, work)

    async def rules(request: web.Request) -> web.Response:
        manager = rules_fn()
        kind = request.query.get("type")
        groups = []
        for evaluator in manager.groups if manager else []:
            rules_out = []
            for rule, health in zip(evaluator.group.rules, evaluator.health, strict=True):
                if (kind == "alert" and not rule.is_alert) or (kind == "record" and rule.is_alert):
                    continue
                base: dict[str, Any] = {
                    "name": rule.name,
                    "query": rule.expr,
                    "labels": rule.labels,
                    "health": health.health,
                    "lastError": health.last_error or None,
                    "evaluationTime": health.evaluation_time_s,
                    "lastEvaluation": _rfc3339(health.last_evaluation_ms),
                }
                if rule.is_alert:
                    alerts = [a for a in health.active.values() if a.state is not AlertState.INACTIVE]
                    state = "inactive"
                    if any(a.state is AlertState.FIRING for a in alerts):
                        state = "firing"
                    elif alerts:
                        state = "pending"
                    base.update(
                        {
                            "type": "alerting",
                            "state": state,
                            "duration": rule.for_ms / 1000,
                            "keepFiringFor": rule.keep_firing_for_ms / 1000,
                            "annotations": rule.annotations,
                            "alerts": [_alert_json(a) for a in alerts],
                        }
                    )
                else:
                    base["type"] = "recording"
                if base.get("lastError") is None:
                    base.pop("lastError")
                rules_out.append(base)
            groups.append(
                {
                    "name": evaluator.group.name,
                    "file": evaluator.group.file,
                    "rules": rules_out,
                    "interval": evaluator.interval_ms / 1000,
                    "limit": evaluator.group.limit,
                    "evaluationTime": evaluator.last_duration_s,
                    "lastEvaluation": _rfc3339(evaluator.last_evaluation_ms),
                }
            )
        return _success({"groups": groups})

    async def alerts(request: web.Request) -> web.Response:
        manager = rules_fn()
        active = manager.active_alerts() if manager else []
        return _success({"alerts": [_alert_json(a) for _, _, a in active]})

    def series_in(
        request_store: Store, match: list[tuple[Matcher, ...]], start: int, end: int, budget: QueryBudget
    ) -> list[Series]:
        found: dict[tuple[tuple[str, str], ...], Series] = {}
        for matchers in match or [()]:
            budget.check()
            for series in request_store.select(list(matchers)):
                ts, _ = series.range(start - 1, end, left_open=True)
                if len(ts):
                    found[series.labels] = series
        return list(found.values())

    async def metadata_query(request: web.Request) -> tuple[list[Series], None] | tuple[None, web.Response]:
        params = await _params(request)
        try:
            match = await _match_params(request)
            start = _parse_time(params.get("start"), 0)
            end = _parse_time(params.get("end"), now_ms())
        except ValueError as exc:
            return None, _error(400, "bad_data", str(exc))
        assert start is not None and end is not None  # both have defaults
        store = engine_fn().store
        try:
            found = await queries.run(
                lambda budget: series_in(store, match, start, end, budget), disconnected=_client_gone(request)
            )
        except PromQLError as exc:
            return None, _execution_error("match[]", exc)
        return found, None

    async def series(request: web.Request) -> web.Response:
        try:
            if not await _match_params(request):
                return _error(400, "bad_data", "no match[] parameter provided")
        except ValueError as exc:
            return _error(400, "bad_data", str(exc))
        found, failure = await metadata_query(request)
        if failure is not None:
            return failure
        assert found is not None
        return _success([dict(s.labels) for s in sorted(found, key=lambda s: s.labels)])

    async def labels(request: web.Request) -> web.Response:
        found, failure = await metadata_query(request)
        if failure is not None:
            return failure
        assert found is not None
        return _success(sorted({name for s in found for name, _ in s.labels}))

    async def label_values(request: web.Request) -> web.Response:
        found, failure = await metadata_query(request)
        if failure is not None:
            return failure
        assert found is not None
        name = request.match_info["name"]
        return _success(sorted({value for s in found for key, value in s.labels if key == name}))

    return [
        web.get("/api/v1/series", series),
        web.post("/api/v1/series", series),
        web.get("/api/v1/labels", labels),
        web.post("/api/v1/labels", labels),
        web.get("/api/v1/label/{name}/values", label_values),
        web.get("/api/v1/query", query),
        web.post("/api/v1/query", query),
        web.get("/api/v1/query_range", query_range),
        web.post("/api/v1/query_range", query_range),
        web.get("/api/v1/rules", rules),
        web.get("/api/v1/alerts", alerts),
    ]
