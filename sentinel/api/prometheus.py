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

from sentinel.promql import Engine, Matrix, PromQLError, Scalar, String, Vector, parse
from sentinel.promql.budget import QueryBudget
from sentinel.promql.runner import QueryRunner
from sentinel.promql.syntax import Node, Selector
from sentinel.rules.group import GroupEvaluator, RuleHealth
from sentinel.rules.manager import RuleManager
from sentinel.rules.rulefile import Rule, parse_prom_duration
from sentinel.rules.state import Alert, AlertState
from sentinel.store import LabelMatcher, Series, Store, now_ms

__all__ = ["PrometheusApi", "prometheus_api_routes"]

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


async def _match_texts(request: web.Request) -> list[str]:
    """Every `match[]` parameter (query string and form), unparsed."""
    texts = list(request.query.getall("match[]", []))
    if request.method == "POST":
        form = await request.post()
        texts += [str(v) for v in form.getall("match[]", [])]
    return texts


def _match_params(texts: list[str]) -> list[tuple[LabelMatcher, ...]]:
    """`match[]` selectors as matcher sets; raises ValueError (run in the query pool: a
    body of thousands of selectors takes seconds to parse)."""
    out: list[tuple[LabelMatcher, ...]] = []
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


def _rule_state(alerts: list[Alert]) -> str:
    if any(a.state is AlertState.FIRING for a in alerts):
        return "firing"
    return "pending" if alerts else "inactive"


def _rule_json(rule: Rule, health: RuleHealth) -> dict[str, Any]:
    """One rule as Prometheus's /api/v1/rules shows it."""
    out: dict[str, Any] = {
        "name": rule.name,
        "query": rule.expr,
        "labels": rule.labels,
        "health": health.health,
        "lastError": health.last_error or None,
        "evaluationTime": health.evaluation_time_s,
        "lastEvaluation": _rfc3339(health.last_evaluation_ms),
    }
    if out["lastError"] is None:
        del out["lastError"]
    if not rule.is_alert:
        out["type"] = "recording"
        return out
    alerts = [a for a in health.active.values() if a.state is not AlertState.INACTIVE]
    out.update(
        {
            "type": "alerting",
            "state": _rule_state(alerts),
            "duration": rule.for_ms / 1000,
            "keepFiringFor": rule.keep_firing_for_ms / 1000,
            "annotations": rule.annotations,
            "alerts": [_alert_json(a) for a in alerts],
        }
    )
    return out


def _group_json(evaluator: GroupEvaluator, kind: str | None) -> dict[str, Any]:
    """One group; `kind` ("alert" or "record") keeps only rules of that type, as Prometheus's `type=`."""
    rules = [
        _rule_json(rule, health)
        for rule, health in zip(evaluator.group.rules, evaluator.health, strict=True)
        if kind is None or (kind == "alert") == rule.is_alert
    ]
    return {
        "name": evaluator.group.name,
        "file": evaluator.group.file,
        "rules": rules,
        "interval": evaluator.interval_ms / 1000,
        "limit": evaluator.group.limit,
        "evaluationTime": evaluator.last_duration_s,
        "lastEvaluation": _rfc3339(evaluator.last_evaluation_ms),
    }


def _series_in(
    store: Store, match: list[tuple[LabelMatcher, ...]], start: int, end: int, budget: QueryBudget
) -> list[Series]:
    """Series with a sample in (start, end] matching any of the `match[]` selectors (all without one)."""
    found: dict[tuple[tuple[str, str], ...], Series] = {}
    for matchers in match or [()]:
        budget.check()
        for series in store.select(list(matchers)):
            ts, _ = series.range(start - 1, end, left_open=True)
            if len(ts):
                found[series.labels] = series
    return list(found.values())


class PrometheusApi:
    """The read side of Prometheus's HTTP API: queries, rules, alerts and metadata.

    The callables return the current engine and rules, so a reload is seen at the next
    request. Queries run on `runner` (the daemon's, which it closes at exit); without
    one, a runner with the default limits.
    """

    def __init__(
        self,
        engine_fn: Callable[[], Engine],
        rules_fn: Callable[[], RuleManager | None],
        runner: QueryRunner | None = None,
    ) -> None:
        self.engine_fn = engine_fn
        self.rules_fn = rules_fn
        self.queries = runner or QueryRunner()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/series", self.series),
            web.post("/api/v1/series", self.series),
            web.get("/api/v1/labels", self.labels),
            web.post("/api/v1/labels", self.labels),
            web.get("/api/v1/label/{name}/values", self.label_values),
            web.get("/api/v1/query", self.query),
            web.post("/api/v1/query", self.query),
            web.get("/api/v1/query_range", self.query_range),
            web.post("/api/v1/query_range", self.query_range),
            web.get("/api/v1/rules", self.rules),
            web.get("/api/v1/alerts", self.alerts),
        ]

    async def _run_query(self, request: web.Request, expr: str, work: Callable[[QueryBudget], bytes]) -> web.Response:
        try:
            body = await self.queries.run(work, disconnected=_client_gone(request))
        except _BadQuery as exc:
            return _error(400, "bad_data", str(exc))
        except Exception as exc:
            return _execution_error(expr, exc)
        return web.Response(body=body, content_type="application/json")

    async def query(self, request: web.Request) -> web.Response:
        params = await _params(request)
        expr = params.get("query")
        if not expr:
            return _error(400, "bad_data", 'invalid parameter "query": missing query')
        try:
            t = _parse_time(params.get("time"), now_ms())
        except ValueError as exc:
            return _error(400, "bad_data", f'invalid parameter "time": {exc}')
        assert t is not None
        engine = self.engine_fn()

        def work(budget: QueryBudget) -> bytes:
            value = engine.instant_query(_parse_query(engine, expr), t, budget=budget).value
            return _result_body(value, t, budget)

        return await self._run_query(request, expr, work)

    async def query_range(self, request: web.Request) -> web.Response:
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
        engine = self.engine_fn()

        def work(budget: QueryBudget) -> bytes:
            value = engine.range_query(_parse_query(engine, expr), start, end, step, budget=budget).value
            return _result_body(value, end, budget)

        return await self._run_query(request, expr, work)

    async def rules(self, request: web.Request) -> web.Response:
        manager = self.rules_fn()
        kind = request.query.get("type")
        kind = kind if kind in ("alert", "record") else None
        return _success({"groups": [_group_json(g, kind) for g in (manager.groups if manager else [])]})

    async def alerts(self, request: web.Request) -> web.Response:
        manager = self.rules_fn()
        active = manager.active_alerts() if manager else []
        return _success({"alerts": [_alert_json(a) for _, _, a in active]})

    async def _matching_series(self, request: web.Request) -> list[Series] | web.Response:
        """The series `match[]`, `start` and `end` select, or the error response."""
        params = await _params(request)
        try:
            texts = await _match_texts(request)
            start = _parse_time(params.get("start"), 0)
            end = _parse_time(params.get("end"), now_ms())
        except ValueError as exc:
            return _error(400, "bad_data", str(exc))
        assert start is not None and end is not None  # both have defaults
        store = self.engine_fn().store

        def work(budget: QueryBudget) -> list[Series]:
            match = _match_params(texts)
            budget.check()
            return _series_in(store, match, start, end, budget)

        try:
            return await self.queries.run(work, disconnected=_client_gone(request))
        except ValueError as exc:
            return _error(400, "bad_data", str(exc))
        except PromQLError as exc:
            return _execution_error("match[]", exc)

    async def series(self, request: web.Request) -> web.Response:
        if not await _match_texts(request):
            return _error(400, "bad_data", "no match[] parameter provided")
        found = await self._matching_series(request)
        if isinstance(found, web.Response):
            return found
        return _success([dict(s.labels) for s in sorted(found, key=lambda s: s.labels)])

    async def labels(self, request: web.Request) -> web.Response:
        found = await self._matching_series(request)
        if isinstance(found, web.Response):
            return found
        return _success(sorted({name for s in found for name, _ in s.labels}))

    async def label_values(self, request: web.Request) -> web.Response:
        found = await self._matching_series(request)
        if isinstance(found, web.Response):
            return found
        name = request.match_info["name"]
        return _success(sorted({value for s in found for key, value in s.labels if key == name}))


def prometheus_api_routes(
    engine_fn: Callable[[], Engine],
    rules_fn: Callable[[], RuleManager | None],
    runner: QueryRunner | None = None,
) -> list[web.RouteDef]:
    """Routes for the daemon's server (see `PrometheusApi`)."""
    return PrometheusApi(engine_fn, rules_fn, runner).routes()
