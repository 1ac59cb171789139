"""Fuzzing the probe-report validator (build item 4): any body ends in a report or a `ReportError`.

The body of a probe report is decoded and validated before anything is written;
whatever arrives, the outcome is a `ProbeReport` within the documented bounds or a
`ReportError` (a 400), never another exception (a 500). Bounded in time.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel.collectors.probe_reports import _decode_json
from sentinel.collectors.probe_schema import MAX_COUNT, MAX_GPUS, MAX_LABEL, ProbeReport, ReportError, parse_report

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def valid() -> dict[str, Any]:
    return {
        "version": 1,
        "kind": "interval",
        "worker": "w0",
        "probe_id": "p",
        "seq": 1,
        "interval_s": 1.0,
        "batch_limit": None,
        "layers": [
            {
                "layer": 0,
                "tokens": 1,
                "balancedness": 0.5,
                "hot_experts": [{"expert": 1, "tokens": 1, "tokens_total": 2}],
            }
        ],
        "gpus": {"0": {"tokens_total": 1, "num_ooms": 0}},
        "oom": None,
    }


_PATHS: list[list[Any]] = [
    ["version"], ["kind"], ["worker"], ["seq"], ["interval_s"], ["batch_limit"], ["layers"], ["layers", 0],
    ["layers", 0, "balancedness"], ["layers", 0, "hot_experts"], ["gpus"], ["gpus", "0"],
    ["gpus", "0", "num_ooms"], ["oom"], ["probe_id"],
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid report with a few fields replaced (at any depth) by random JSON."""
    report = valid()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_PATHS))
        value = draw(_JSON)
        target: Any = report
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation replaced a container on the path
    if draw(st.booleans()):
        report["kind"] = "oom"
    return report


def _check(obj: object) -> None:
    try:
        report = parse_report(obj)
    except ReportError as exc:
        assert str(exc).startswith("report"), str(exc)
        return
    assert isinstance(report, ProbeReport)
    assert 0 < len(report.worker) <= MAX_LABEL and len(report.gpus) <= MAX_GPUS
    for gpu in report.gpus.values():
        assert gpu.num_ooms is None or 0 <= gpu.num_ooms <= MAX_COUNT


@FUZZ
@given(mutated())
def test_mutated_reports_validate_or_raise_report_error(report: dict[str, Any]) -> None:
    _check(report)


@FUZZ
@given(_JSON)
def test_any_json_value_validates_or_raises_report_error(value: object) -> None:
    _check(value)


@FUZZ
@given(
    st.binary(max_size=300)
    | mutated().map(lambda r: json.dumps(r).encode())
    | st.integers(1, 50_000).map(lambda n: b"[" * n)
    | st.integers(4000, 6000).map(lambda n: b'{"seq": ' + b"9" * n + b"}")
    | st.sampled_from([b"NaN", b'{"interval_s": Infinity}', b"\xff\xfe", b'{"a": 1e999}'])
)
def test_any_body_decodes_and_validates_or_raises_report_error(raw: bytes) -> None:
    try:
        decoded = _decode_json(raw)
    except ReportError:
        return
    _check(decoded)
