"""PromQL evaluation over Sentinel's in-memory store (Prometheus 3.x semantics).

    engine = Engine(store)
    engine.instant('sum by (gpu) (rate(xid_errors_total[5m])) > 0', now_ms)
    engine.range("up", start_ms, end_ms, step_ms)

`Engine(store, prometheus_compat=2)` follows Prometheus 2.42 instead (windows that
include their start, its syntax and arithmetic); `parse(text, 2)` checks 2.42's syntax.

Expressions are parsed once (cached by text) with promql-parser; values are the
typed `Scalar`, `String`, `Vector` and `Matrix`; every query error is a
`PromQLError`. `metric_names(expr)` lists the metrics an expression reads.
Native histograms are not supported (the store holds floats only).
"""

from sentinel.promql.engine import Engine, QueryResult
from sentinel.promql.model import (
    Annotations,
    Matrix,
    PromQLError,
    RangeSeries,
    Sample,
    Scalar,
    String,
    Value,
    Vector,
)
from sentinel.promql.syntax import Node, metric_names, parse, reads_any_metric

__all__ = [
    "Annotations",
    "Engine",
    "Matrix",
    "Node",
    "PromQLError",
    "QueryResult",
    "RangeSeries",
    "Sample",
    "Scalar",
    "String",
    "Value",
    "Vector",
    "metric_names",
    "parse",
    "reads_any_metric",
]
