"""Prometheus-shaped HTTP API over the local store and rules.

`/api/v1/query`, `/api/v1/query_range`, `/api/v1/rules` and `/api/v1/alerts` answer in
the same JSON shapes as Prometheus, so Grafana's Prometheus data source, amtool-style
scripts and curl habits work against a single host's Sentinel, at 1 s resolution.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from aiohttp import web

from sentinel.promql import Engine, Matrix, PromQLError, Scalar, String, Vector, parse
from sentinel.promql.syntax import Selector
from sentinel.rules.manager import RuleManager
from sentinel.rules.rulefile import parse_prom_duration
from sentinel.rules.state import Alert, AlertState
from sentinel.store import LabelMatcher, Series, Store, now_ms

__all__ = ["prometheus_api_routes"]

log = logging.getLogger(__name__)

MAX_POINTS = 11_000  # Prometheus refuses range queries above this many points per series


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
            return round(seconds * 1000)
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        raise ValueError(f'cannot parse "{text}" to a valid timestamp') from None


def _parse_step(text: str | None) -> int:
    if not text:
        raise ValueError("missing step")
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parse_prom_duration(text) / 1000
        except ValueError:
            raise ValueError(f'cannot parse "{text}" to a valid duration') from None
    if seconds <= 0:
        raise ValueError("zero or negative query resolution step widths are not accepted. Try a positive integer")
    return round(seconds * 1000)


def _check_query(expr: str) -> web.Response | None:
    """A parse error is the client's: 400 bad_data, as Prometheus answers it."""
    try:
        parse(expr)
    except (PromQLError, ValueError, OverflowError) as exc:  # `up @ 1e19` fails in conversion
        return _error(400, "bad_data", f'invalid parameter "query": {exc}')
    return None


def _execution_error(expr: str, exc: Exception) -> web.Response:
    """An evaluation error: 422 execution, never a bare 500 without the JSON body."""
    if not isinstance(exc, PromQLError):
        log.warning("query %r failed unexpectedly: %r", expr, exc)
    return _error(422, "execution", str(exc) or type(exc).__name__)


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


async def _match_params(request: web.Request) -> list[tuple[LabelMatcher, ...]]:
    """Every `match[]` selector (query string and form) as matcher sets; raises ValueError."""
    texts = list(request.query.getall("match[]", []))
    if request.method == "POST":
        form = await request.post()
        texts += [str(v) for v in form.getall("match[]", [])]
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


def prometheus_api_routes(
    engine_fn: Callable[[], Engine], rules_fn: Callable[[], RuleManager | None]
) -> list[web.RouteDef]:
    """Routes for the daemon's server; the callables see the current engine and rules after a reload."""

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
        bad_query = _check_query(expr)
        if bad_query is not None:
            return bad_query
        engine = engine_fn()
        try:
            value = await asyncio.to_thread(engine.instant, expr, t)
        except Exception as exc:
            return _execution_error(expr, exc)
        return _success(_result_json(value, t))

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
        bad_query = _check_query(expr)
        if bad_query is not None:
            return bad_query
        engine = engine_fn()
        try:
            value = await asyncio.to_thread(engine.range, expr, start, end, step)
        except Exception as exc:
            return _execution_error(expr, exc)
        return _success(_result_json(value, end))

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

    def series_in(request_store: Store, match: list[tuple[LabelMatcher, ...]], start: int, end: int) -> list[Series]:
        found: dict[tuple[tuple[str, str], ...], Series] = {}
        for matchers in match or [()]:
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
        return await asyncio.to_thread(series_in, store, match, start, end), None

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
