"""The bridge from the PromQL engine to the rule evaluator's `QueryFn`.

Prometheus's `rules.EngineQueryFunc` turns a query result into the instant vector a
rule consumes: a vector as is, a scalar as one sample without labels, anything else
an error. `engine_query` does the same over Sentinel's `Engine`, so the daemon and
`sentinel test rules` evaluate rules through one code path.

Rules are evaluated one after another at one time (the rule manager runs them in one
thread), so the queries share sub-expression results (`Engine.shared_results`): a
group's warning and critical rules over `rate(x[5m])` compute it once. Results are the
same as with independent queries: a result is reused only while the store reports no
write to the metrics it reads.
"""

from __future__ import annotations

from sentinel.alerting.group import QueryError, QueryFn, VectorSample
from sentinel.promql import Engine, PromQLError, Scalar, Vector

__all__ = ["engine_query"]


def engine_query(engine: Engine) -> QueryFn:
    """A QueryFn evaluating expressions with `engine`; PromQL errors become QueryError."""

    shared = engine.shared_results()

    def query(expr: str, t_ms: int) -> list[VectorSample]:
        try:
            value = engine.instant(expr, t_ms, shared=shared, as_rule=True)
        except PromQLError as exc:
            raise QueryError(str(exc)) from exc
        if isinstance(value, Vector):
            # `__name__` stays: templates see it in $labels, and the evaluator drops it
            # from alert labels itself.
            return [(dict(sample.labels), sample.value) for sample in value]
        if isinstance(value, Scalar):
            return [({}, value.value)]
        raise QueryError("rule result is not a vector or scalar")

    return query
