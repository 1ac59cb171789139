"""Prometheus 2 compatibility mode (`prometheus_compat=2`) against the real promtool 2.42.

Syntax: every construct 2.42 refuses is refused with promtool's exact message, and
2.42's `holt_winters` parses. Semantics: Sentinel's mode-2 results are written as a
`promtool test rules` expectation, and promtool must agree with every value exactly.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sentinel.alerting.query import engine_query
from sentinel.promql import Engine, PromQLError, Vector, syntax
from sentinel.promql.engine import check_compat
from sentinel.promql.labels import format_series
from sentinel.promql.testformat import parse_series_line
from sentinel.store import Store
from tests.conftest import require_tool

# (expression, promtool 2.42's message after "could not parse expression: ")
REFUSED_BY_2_42 = [
    ("info(up)", '1:1: parse error: unknown function with name "info"'),
    ("limitk(2, up)", '1:1: parse error: unknown function with name "limitk"'),
    ("limit_ratio(0.5, up)", '1:1: parse error: unknown function with name "limit_ratio"'),
    (
        "double_exponential_smoothing(up[5m], 0.5, 0.5)",
        '1:1: parse error: unknown function with name "double_exponential_smoothing"',
    ),
    ("mad_over_time(up[5m])", '1:1: parse error: unknown function with name "mad_over_time"'),
    ("first_over_time(up[5m])", '1:1: parse error: unknown function with name "first_over_time"'),
    ("ts_of_max_over_time(up[5m])", '1:1: parse error: unknown function with name "ts_of_max_over_time"'),
    ("histogram_avg(up)", '1:1: parse error: unknown function with name "histogram_avg"'),
    ('sort_by_label(up, "a")', '1:1: parse error: unknown function with name "sort_by_label"'),
    ("up + fill(0) up", '1:6: parse error: unknown function with name "fill"'),
    ("up + on(a) fill_left(0) up", '1:12: parse error: unknown function with name "fill_left"'),
    ('{"a.b"="c"}', '1:2: parse error: unexpected string "\\"a.b\\"" in label matching, expected identifier or "}"'),
    (
        '{"metric.name"}',
        '1:2: parse error: unexpected string "\\"metric.na"... in label matching, expected identifier or "}"',
    ),
    ('x{a="1" or b="2"}', '1:9: parse error: unexpected identifier "or" in label matching, expected "," or "}"'),
    ('sum by ("a") (x)', '1:9: parse error: unexpected string "\\"a\\"" in grouping opts, expected label'),
    ("x[90]", "1:3: parse error: missing unit character in duration"),
    ("x[1.5m]", '1:3: parse error: not a valid duration string: "1.5m"'),
    ("x offset 90", '1:10: parse error: unexpected number "90" in offset, expected duration'),
    ("x[1m:30]", '1:6: parse error: unexpected number "30" in subquery selector, expected duration or "]"'),
    ("1_000", '1:1: parse error: bad number or duration syntax: "1"'),
    ("start()", '1:6: parse error: unexpected "("'),
    ("step()", '1:1: parse error: unknown function with name "step"'),
    (
        'sum(info(x{"a"="b"}))',
        '1:12: parse error: unexpected string "\\"a\\"" in label matching, expected identifier or "}"',
    ),
    ("info(x) + limitk(1, y)", '1:1: parse error: unknown function with name "info"'),
    ("info(sum(limitk(1, x)))", '1:10: parse error: unknown function with name "limitk"'),
]

ACCEPTED_BY_BOTH = [
    'sum by (a) (rate(x{a=~"b.*"}[5m])) > 0',
    "x @ start() + x offset -5m",
    "rate(x[5m:1m])",
    'x{a="b\u00e9"} # a comment',
    "histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m])))",
    'label_replace(x, "a", "$1", "b", "(.*)")',
    "SUM(x) BY (a)",
]


@pytest.mark.parametrize(("expr", "message"), REFUSED_BY_2_42)
def test_mode_2_refuses_what_promtool_2_42_refuses_with_its_message(expr: str, message: str) -> None:
    with pytest.raises(PromQLError) as caught:
        syntax.parse(expr, 2)
    assert str(caught.value) == message
    if expr not in ("start()", "step()", "1_000", "x[1.5m]"):
        syntax.parse(expr)  # Prometheus 3 syntax: mode 3 accepts it


@pytest.mark.parametrize("expr", ACCEPTED_BY_BOTH)
def test_mode_2_accepts_what_2_42_accepts(expr: str) -> None:
    assert type(syntax.parse(expr, 2)) is type(syntax.parse(expr, 3))


def test_regex_dot_matches_newline_only_in_mode_3() -> None:
    store = Store()
    store.add("nl", 1, {"a": "a\nb"}, timestamp_ms=0)
    store.add("nl", 1, {"a": "axb"}, timestamp_ms=0)
    expr = 'count(nl{a=~"a.b"}) + count(label_replace(nl, "m", "$1", "a", "a(.)b"))'
    assert [s.value for s in Engine(store).instant(expr, 0)] == [4.0]  # type: ignore[union-attr]
    assert [s.value for s in Engine(store, prometheus_compat=2).instant(expr, 0)] == [3.0]  # type: ignore[union-attr]


def test_holt_winters_is_2_42_only_and_equals_double_exponential_smoothing() -> None:
    with pytest.raises(PromQLError, match="holt_winters"):
        syntax.parse("holt_winters(x[5m], 0.5, 0.1)")
    store = Store()
    for i, v in enumerate([1.0, 4.0, 2.0, 8.0, 5.0]):
        store.add("x", v, timestamp_ms=i * 60_000)
    mode2 = Engine(store, prometheus_compat=2).instant("holt_winters(x[5m], 0.5, 0.1)", 240_000)
    mode3 = Engine(store).instant("double_exponential_smoothing(x[5m], 0.5, 0.1)", 240_000)
    assert isinstance(mode2, Vector) and mode2 == mode3 and len(mode2) == 1


def test_compat_must_be_2_or_3() -> None:
    with pytest.raises(ValueError, match="must be 2 or 3"):
        Engine(Store(), prometheus_compat=4)
    with pytest.raises(ValueError, match="must be 2 or 3"):
        check_compat(True)
    with pytest.raises(ValueError, match="must be 2 or 3"):
        syntax.parse("up", 1)


def _store(series: dict[str, str], interval_ms: int) -> Store:
    store = Store(retention_ms=10**12)
    for text, values in series.items():
        labels, points = parse_series_line(f"{text} {values}", 1)
        for i, value in enumerate(points):
            if isinstance(value, float):
                store.append(labels, i * interval_ms, value)
    return store


def test_windows_include_their_start_in_mode_2_and_exclude_it_in_mode_3() -> None:
    store = _store({"x": "1", "y": "1 2 3"}, 60_000)
    two, three = Engine(store, prometheus_compat=2), Engine(store)
    assert [s.value for s in two.instant("x", 300_000)] == [1.0]  # type: ignore[union-attr]
    assert three.instant("x", 300_000) == Vector()
    assert [s.value for s in two.instant("count_over_time(y[1m])", 120_000)] == [2.0]  # type: ignore[union-attr]
    assert [s.value for s in three.instant("count_over_time(y[1m])", 120_000)] == [1.0]  # type: ignore[union-attr]
    # Subquery steps: 2.x starts at the window's start when it is aligned.
    assert [s.value for s in two.instant("count_over_time(y[2m:1m])", 120_000)] == [3.0]  # type: ignore[union-attr]
    assert [s.value for s in three.instant("count_over_time(y[2m:1m])", 120_000)] == [2.0]  # type: ignore[union-attr]


def test_mode_2_drops_the_metric_name_in_each_function() -> None:
    store = _store({'a{j="1"}': "1", 'b{j="1"}': "2"}, 60_000)
    # 2.42 drops __name__ in abs(): label_replace sees none, and the duplicate fails at once.
    expr = 'label_replace(abs({__name__=~"a|b"}), "n", "$1", "__name__", "(.*)")'
    assert Engine(store).instant(expr, 0) != Vector()
    with pytest.raises(PromQLError, match="same labelset"):
        Engine(store, prometheus_compat=2).instant(expr, 0)


def test_absent_in_a_rule_uses_the_reprinted_expression_with_sorted_matchers() -> None:
    engine = Engine(Store())
    expr = 'absent(x{k="c", j="j", j!~"z"})'
    query = engine_query(engine)
    assert query(expr, 0) == [({"j": "j", "k": "c"}, 1.0)]
    plain = engine.instant(expr, 0)
    assert isinstance(plain, Vector) and [dict(s.labels) for s in plain] == [{"k": "c"}]


# -- differential tests against promtool 2.42 ---------------------------------------------

SERIES = {
    'x{job="a"}': "1 _ _ _ _ _ _ _ _ _ _",
    'c{job="a"}': "0 3 7 12 20 5 9 16 30 31 35",
    'c{job="b"}': "10 10.3 10.9 11 11.7 12.1 12.2 12.2 13.9 14.1 15",
    'g{job="a"}': "0.1 0.7 0.2 0.35 0.9 0.33 0.1 0.45 0.6 0.05 0.8",
    'g{job="b"}': "1e10 3 -7.3 1e-3 4.4 5.5 -2 0.25 8 9.75 -1",
    'g{job="c"}': "0.3 0.3 0.3 0.3 0.3 0.3 0.3 0.3 0.3 0.3 0.3",
    'h_bucket{le="0.1"}': "0 1 3 4 4 6 9 9 10 12 15",
    'h_bucket{le="1"}': "0 2 3 5 5 7 9 11 13 12 20",
    'h_bucket{le="+Inf"}': "0 3 5 6 7 9 12 13 15 18 21",
    'z{k="c", j="j"}': "1 1 1 1 1 1 1 1 1 1 1",
    # promtool 2.42 loads test series from a Go map, so the order in which `sum`, `avg`
    # and `stddev` see 3+ series (and the last bits of their results) changes from run
    # to run: these values aggregate exactly in any order.
    'nl{a="a\\nb"}': "1 1 1 1 1 1 1 1 1 1 1",
    'nl{a="axb"}': "1 1 1 1 1 1 1 1 1 1 1",
    'q{job="a"}': "0.5 1.25 -3 4 3 2 1 8 -0.75 3 0.5",
    'q{job="b"}': "2 0.25 1 -1 0 6 -2.5 1 0.25 1 1.5",
    'q{job="c"}': "-1.5 0.5 2 0.375 0 -4 1 0.5 1 0.25 2",
}

EXPRESSIONS = [
    ("x", "5m"),
    ("x", "6m"),
    ("count_over_time(c[1m])", "2m"),
    ("rate(c[5m])", "10m"),
    ("increase(c[3m])", "7m"),
    ("increase(c[2m])", "2m"),
    ("rate(c[1m])", "1m"),
    ("delta(g[4m])", "9m"),
    ("irate(c[5m])", "10m"),
    ("avg_over_time(g[10m])", "10m"),
    ("stddev_over_time(g[10m])", "10m"),
    ("stdvar_over_time(g[6m])", "8m"),
    ("sum_over_time(g[10m])", "10m"),
    ("quantile_over_time(0.3, g[10m])", "10m"),
    ("sum(q)", "3m"),
    ("avg(q)", "4m"),
    ("stddev(q)", "5m"),
    ("stdvar(q)", "7m"),
    ("sum by (job) (g)", "7m"),
    ("sum(rate(c[5m]))", "10m"),
    ("deriv(g[10m])", "10m"),
    ("predict_linear(g[10m], 3600)", "10m"),
    ("holt_winters(g[10m], 0.3, 0.6)", "10m"),
    ("max_over_time(g[5m:1m])", "10m"),
    ("rate(c[5m:1m])", "10m"),
    ("count_over_time(c[3m:1m])", "9m"),
    ("histogram_quantile(0.5, h_bucket)", "9m"),
    ("histogram_quantile(0.9, rate(h_bucket[5m]))", "10m"),
    ("changes(g[10m])", "10m"),
    ('label_replace(abs(g), "n", "$1", "__name__", "(.*)")', "1m"),
    ("-g", "2m"),
    ("g > 0.3", "3m"),
    ("timestamp(x)", "4m"),
    ('count(nl{a=~"a.b"})', "1m"),
    ('label_replace(nl, "m", "$1", "a", "a(.)b")', "1m"),
]


def _promtool_test(
    tmp_path: Path, series: dict[str, str], body: str, rules: str = "groups: []\n"
) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` on one test group: `series` at 1m, then `body` (its test cases)."""
    promtool = require_tool("promtool", "prometheus")
    (tmp_path / "rules.yml").write_text(rules)
    lines = ["rule_files: [rules.yml]", "evaluation_interval: 1m", "tests:", "- interval: 1m", "  input_series:"]
    for text, values in series.items():
        lines.append(f"  - series: {json.dumps(text)}")
        lines.append(f"    values: {json.dumps(values)}")
    test = tmp_path / "test.yml"
    test.write_text("\n".join(lines) + "\n" + body)
    return subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_mode_2_results_equal_promtool_2_42_bit_for_bit(tmp_path: Path) -> None:
    engine = Engine(_store(SERIES, 60_000), prometheus_compat=2)
    lines = ["  promql_expr_test:"]
    for expr, at in EXPRESSIONS:
        t_ms = syntax.parse(f"x offset {at}").offset_ms  # type: ignore[union-attr]
        value = engine.instant(expr, t_ms)
        assert isinstance(value, Vector), expr
        lines.append(f"  - expr: {json.dumps(expr)}")
        lines.append(f"    eval_time: {at}")
        lines.append("    exp_samples:" + ("" if value else " []"))
        for sample in sorted(value, key=lambda s: s.labels):
            lines.append(f"    - labels: {json.dumps(format_series(sample.labels))}")
            lines.append(f"      value: {sample.value!r}")
    result = _promtool_test(tmp_path, SERIES, "\n".join(lines) + "\n")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_mode_2_absent_alert_labels_equal_promtool_2_42(tmp_path: Path) -> None:
    rule = 'absent(z{k="c", j="j", j!~"z"} offset 1h)'
    labels = engine_query(Engine(Store(), prometheus_compat=2))(rule, 0)[0][0]
    rules = f"groups:\n- name: g\n  rules:\n  - alert: Gone\n    expr: {json.dumps(rule)}\n"
    expected = json.dumps({"alertname": "Gone", **labels})
    body = (
        f"  alert_rule_test:\n  - eval_time: 1m\n    alertname: Gone\n    exp_alerts:\n    - exp_labels: {expected}\n"
    )
    result = _promtool_test(tmp_path, SERIES, body, rules)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
@pytest.mark.parametrize(("expr", "message"), REFUSED_BY_2_42)
def test_refusal_messages_are_promtools(tmp_path: Path, expr: str, message: str) -> None:
    promtool = require_tool("promtool", "prometheus")
    rules = tmp_path / "r.yml"
    rules.write_text(f"groups:\n- name: g\n  rules:\n  - record: x\n    expr: {json.dumps(expr)}\n")
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert f"could not parse expression: {message}\n" in result.stdout + result.stderr
