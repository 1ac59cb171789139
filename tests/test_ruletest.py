"""`sentinel test rules` against the real `promtool test rules` (Prometheus 2.42).

The fixtures in tests/data/ruletests run under both tools; they must agree on the
verdict and, where the report is promtool's own wording, on every byte of it. Cases
that need no promtool (the report formats, the query adapter, documented departures
from 2.42) run everywhere.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sentinel.promql import Engine
from sentinel.promtool.ruletest import (
    TestFileError,
    format_float_e,
    format_go_duration,
    format_model_duration,
    main,
    parse_test_file,
    run_files,
)
from sentinel.rules.group import QueryError
from sentinel.rules.query import engine_query
from sentinel.store import Store, labels_from
from tests.conftest import require_tool

DATA = Path(__file__).with_name("data") / "ruletests"

# Fixture file -> the exit status both tools must give it.
FIXTURES = {
    "gpu.test.yml": 0,
    "serving.test.yml": 0,
    "staleness.test.yml": 0,
    "failing.test.yml": 1,
}


def _sentinel(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # These tests compare with promtool 2.42: Sentinel in its Prometheus 2 mode.
        [sys.executable, "-m", "sentinel.promtool.ruletest", "--prometheus-compat", "2", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _promtool(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool", "prometheus")
    return subprocess.run([promtool, "test", "rules", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _write(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)


# -- agreement with promtool -------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_fixture_gives_promtools_verdict_and_report(fixture: str) -> None:
    ours = _sentinel([fixture], DATA)
    theirs = _promtool([fixture], DATA)
    assert (ours.returncode, theirs.returncode) == (FIXTURES[fixture], FIXTURES[fixture]), ours.stderr
    assert ours.stdout == theirs.stdout
    assert ours.stderr == theirs.stderr


@pytest.mark.integration
def test_broken_rule_file_fails_in_both_with_promtools_words() -> None:
    ours = _sentinel(["broken.test.yml"], DATA)
    theirs = _promtool(["broken.test.yml"], DATA)
    assert (ours.returncode, theirs.returncode) == (1, 1)
    assert (ours.stdout, ours.stderr) == (theirs.stdout, theirs.stderr)
    assert "rules/broken.yml: yaml: unmarshal errors:\n  line 9: field severity not found" in ours.stderr


@pytest.mark.integration
def test_several_files_exit_nonzero_when_one_fails_like_promtool() -> None:
    files = ["gpu.test.yml", "failing.test.yml", "serving.test.yml"]
    ours = _sentinel(files, DATA)
    theirs = _promtool(files, DATA)
    assert ours.returncode == theirs.returncode == 1
    assert (ours.stdout, ours.stderr) == (theirs.stdout, theirs.stderr)


RULES = """
groups:
  - name: g
    rules:
      - record: dup
        expr: label_replace(x, "a", "", "a", ".*")
      - alert: Always
        expr: vector(1)
        labels: {severity: info}
"""

# Cases where Sentinel must print exactly what promtool prints (name -> files).
EXACT_CASES: dict[str, dict[str, str]] = {
    "unknown_field_in_test_file": {"t.yml": "rule_files: []\nbogus: 1\ntests: []\n"},
    "type_errors_in_document_order": {"t.yml": "tests: 5\nrule_files: {a: 1}\n"},
    "unknown_fields_nested": {
        "t.yml": "tests:\n- interval: 1m\n  inputs: []\n  alert_rule_test:\n  - eval_time: 1m\n    alert: X\n"
    },
    "bad_duration": {"t.yml": "tests:\n- promql_expr_test:\n  - expr: up\n    eval_time: 5x\n"},
    "sample_values_go_yaml_accepts_or_refuses": {
        "t.yml": "tests:\n- promql_expr_test:\n  - expr: vector(1)\n    eval_time: 1m\n"
        '    exp_samples: [{value: "1"}, {value: 1e0}, {value: 0x10}, {value: yes}, {value: verylongstring}]\n'
    },
    "empty_test_file_passes": {"t.yml": ""},
    "group_order_repeated": {"t.yml": "group_eval_order: [a, b, a]\ntests: []\n"},
    "missing_rule_file_warns_and_runs": {
        "t.yml": "rule_files: [nomatch*.yml]\ntests:\n- interval: 1m\n  promql_expr_test:\n"
        "  - expr: 1 + 1\n    eval_time: 1m\n    exp_samples: [{labels: '{}', value: 2}]\n"
    },
    "missing_alertname": {
        "t.yml": "tests:\n- name: mine\n  interval: 1m\n  alert_rule_test:\n  - eval_time: 90s\n    exp_alerts: []\n"
    },
    "rule_evaluation_error_ends_the_test_group": {
        "r.yml": RULES,
        "t.yml": "rule_files: [r.yml]\ntests:\n- interval: 1m\n  input_series:\n"
        "  - {series: 'x{a=\"1\"}', values: 1x5}\n  - {series: 'x{a=\"2\"}', values: 1x5}\n"
        "  alert_rule_test:\n  - {eval_time: 2m, alertname: Always}\n",
    },
    "non_vector_results_are_errors": {
        "t.yml": "tests:\n- interval: 1m\n  promql_expr_test:\n  - {expr: 'up[5m]', eval_time: 1m}\n"
        "  - {expr: '\"text\"', eval_time: 1m}\n"
    },
    "for_zero_fires_at_once_and_writes_alerts_series": {
        "r.yml": "groups:\n- name: g\n  rules:\n  - {alert: Always, expr: vector(1), labels: {severity: info}}\n",
        "t.yml": "rule_files: [r.yml]\ntests:\n- interval: 1m\n  alert_rule_test:\n"
        "  - {eval_time: 0m, alertname: Always, exp_alerts: [{exp_labels: {severity: info}}]}\n"
        "  promql_expr_test:\n  - expr: ALERTS\n    eval_time: 0m\n    exp_samples:\n"
        '    - {labels: \'ALERTS{alertname="Always", alertstate="firing", severity="info"}\', value: 1}\n',
    },
    # promtool loads input only up to the last evaluation step (120s here), so the
    # query at 150s sees the 120s sample (4), not the 150s one (5).
    "promql_test_sees_samples_up_to_the_last_step": {
        "t.yml": "tests:\n- interval: 30s\n  input_series:\n  - {series: m, values: 0+1x10}\n"
        "  promql_expr_test:\n  - {expr: m, eval_time: 150s, exp_samples: [{labels: m, value: 4}]}\n"
    },
    "duplicate_expected_labels_are_listed_reversed_like_go_sort": {
        "t.yml": "tests:\n- interval: 1m\n  promql_expr_test:\n  - expr: vector(1)\n    eval_time: 1m\n"
        "    exp_samples: [{labels: '{}', value: .inf}, {value: 1_0}, {value: -3}]\n"
    },
    "expected_nan_never_matches": {
        "t.yml": "tests:\n- interval: 1m\n  promql_expr_test:\n"
        "  - {expr: vector(0) / 0, eval_time: 1m, exp_samples: [{value: .nan}]}\n"
        "  - {expr: 0.1 + 0.2, eval_time: 1m, exp_samples: [{value: 0.3}]}\n"
    },
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_report_matches_promtool_exactly(case: str, tmp_path: Path) -> None:
    _write(tmp_path, EXACT_CASES[case])
    ours = _sentinel(["t.yml"], tmp_path)
    theirs = _promtool(["t.yml"], tmp_path)
    assert ours.returncode == theirs.returncode
    assert ours.stdout == theirs.stdout
    assert ours.stderr == theirs.stderr


# -- without promtool ----------------------------------------------------------------------


def test_failing_fixture_report_matches_recorded_promtool_output() -> None:
    result = _sentinel(["failing.test.yml"], DATA)
    expected = (DATA / "failing.expected").read_text()
    assert result.returncode == 1
    assert result.stderr == expected
    # One blank line on stdout per failure, then one closing the file.
    failures = expected.count("    alertname: ") + expected.count("    expr: ")
    assert result.stdout == "Unit Testing:  failing.test.yml\n" + "\n" * (failures + 1)


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_fixture_verdict(fixture: str) -> None:
    assert _sentinel([fixture], DATA).returncode == FIXTURES[fixture]


def test_prometheus_3_prints_no_unit_testing_line(tmp_path: Path) -> None:
    # promtool 3.x dropped the `Unit Testing:  FILE` header (it writes JUnit XML instead).
    _write(tmp_path, {"t.yml": "tests:\n- interval: 1m\n  input_series: [{series: up, values: '1'}]\n"})
    out, err = io.StringIO(), io.StringIO()
    assert run_files([str(tmp_path / "t.yml")], out, err)
    assert (out.getvalue(), err.getvalue()) == ("  SUCCESS\n\n", "")
    out = io.StringIO()
    assert run_files([str(tmp_path / "t.yml")], out, err, prometheus_compat=2)
    assert out.getvalue() == f"Unit Testing:  {tmp_path / 't.yml'}\n  SUCCESS\n\n"


def test_missing_test_file_stops_the_run_before_any_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # promtool's argument check: nothing is tested when a named file does not exist.
    missing = str(tmp_path / "nope.yml")
    assert main([missing]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"sentinel: error: path '{missing}' does not exist, try --help\n"


def test_interval_defaults_to_evaluation_interval_in_prometheus_3(tmp_path: Path) -> None:
    # Prometheus 3's promtool (and the documentation); 2.42 loads every sample at t=0.
    _write(
        tmp_path,
        {
            "t.yml": "evaluation_interval: 30s\ntests:\n- input_series:\n  - {series: m, values: 0+1x10}\n"
            "  promql_expr_test:\n  - {expr: m, eval_time: 90s, exp_samples: [{labels: m, value: 3}]}\n"
        },
    )
    assert parse_test_file((tmp_path / "t.yml").read_text()).tests[0].interval_ms == 30_000
    out, err = io.StringIO(), io.StringIO()
    assert run_files([str(tmp_path / "t.yml")], out, err), err.getvalue()


@pytest.mark.integration
def test_without_interval_prometheus_2_loads_every_sample_at_zero_first_one_winning(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "t.yml": "tests:\n- input_series:\n  - {series: m, values: '_ 7 1+1x10'}\n  - {series: n, values: '5 6'}\n"
            "  promql_expr_test:\n  - {expr: m, eval_time: 90s, exp_samples: [{labels: m, value: 7}]}\n"
            "  - {expr: n, eval_time: 4m, exp_samples: [{labels: n, value: 6}]}\n"
        },
    )
    assert parse_test_file((tmp_path / "t.yml").read_text(), prometheus_compat=2).tests[0].interval_ms == 0
    ours = _sentinel(["t.yml"], tmp_path)
    theirs = _promtool(["t.yml"], tmp_path)
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
    assert 'exp: {__name__="n"} 6E+00\n        got: {__name__="n"} 5E+00' in ours.stderr


def test_keep_firing_for_holds_a_resolved_alert(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "r.yml": "groups:\n- name: g\n  rules:\n  - {alert: Down, expr: up == 0, keep_firing_for: 2m}\n",
            "t.yml": "rule_files: [r.yml]\ntests:\n- interval: 1m\n"
            "  input_series: [{series: up, values: '0 0 1x8'}]\n  alert_rule_test:\n"
            "  - {eval_time: 3m, alertname: Down, exp_alerts: [{}]}\n"
            "  - {eval_time: 4m, alertname: Down, exp_alerts: []}\n",
        },
    )
    out, err = io.StringIO(), io.StringIO()
    assert run_files([str(tmp_path / "t.yml")], out, err), err.getvalue()


def test_pending_alert_is_not_listed_and_report_names_the_test_group(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "r.yml": "groups:\n- name: g\n  rules:\n  - {alert: Slow, expr: vector(1), for: 5m}\n",
            "t.yml": "rule_files: [r.yml]\ntests:\n- name: pending\n  interval: 1m\n"
            "  alert_rule_test:\n  - {eval_time: 4m, alertname: Slow, exp_alerts: [{}]}\n",
        },
    )
    out, err = io.StringIO(), io.StringIO()
    assert not run_files([str(tmp_path / "t.yml")], out, err)
    assert err.getvalue() == (
        "  FAILED:\n"
        "    name: pending,\n"
        "    alertname: Slow, time: 4m, \n"
        "        exp:[\n"
        "            0:\n"
        '              Labels:{alertname="Slow"}\n'
        "              Annotations:{}\n"
        "            ], \n"
        "        got:[]\n"
    )


def test_unknown_field_is_a_test_file_error_with_its_line() -> None:
    with pytest.raises(TestFileError, match=r"line 3: field inputs not found in type main.testGroup"):
        parse_test_file("tests:\n- interval: 1m\n  inputs: []\n")


# -- the query adapter -----------------------------------------------------------------------


def _engine() -> Engine:
    store = Store()
    store.append(labels_from("up", {"job": "a"}), 0, 1.0)
    return Engine(store)


def test_query_adapter_returns_vector_samples_with_their_name() -> None:
    assert engine_query(_engine())("up", 60_000) == [({"__name__": "up", "job": "a"}, 1.0)]


def test_query_adapter_turns_a_scalar_into_one_unlabelled_sample() -> None:
    assert engine_query(_engine())("1 + 2", 0) == [({}, 3.0)]


@pytest.mark.parametrize("expr", ["up[5m]", '"text"'])
def test_query_adapter_refuses_non_vector_results(expr: str) -> None:
    with pytest.raises(QueryError, match="rule result is not a vector or scalar"):
        engine_query(_engine())(expr, 60_000)


def test_query_adapter_turns_promql_errors_into_query_errors() -> None:
    with pytest.raises(QueryError, match="parse error"):
        engine_query(_engine())("up(", 0)


# -- Go's text forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0E+00"),
        (-0.0, "-0E+00"),
        (1.0, "1E+00"),
        (1500.0, "1.5E+03"),
        (0.1, "1E-01"),
        (0.30000000000000004, "3.0000000000000004E-01"),
        (1e-7, "1E-07"),
        (1e300, "1E+300"),
        (-2.5e-310, "-2.5E-310"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_format_float_e_is_gos_shortest_E_form(value: float, text: str) -> None:
    assert format_float_e(value) == text


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_format_float_e_round_trips(value: float) -> None:
    assert float(format_float_e(value)) == value


@pytest.mark.parametrize(
    ("ms", "model", "go"),
    [
        (0, "0s", "0s"),
        (500, "500ms", "500ms"),
        (1_500, "1s500ms", "1.5s"),
        (60_000, "1m", "1m0s"),
        (90_000, "1m30s", "1m30s"),
        (630_000, "10m30s", "10m30s"),
        (3_600_000, "1h", "1h0m0s"),
        (86_400_000, "1d", "24h0m0s"),
        (14 * 86_400_000, "2w", "336h0m0s"),
        (90 * 86_400_000, "90d", "2160h0m0s"),
        (365 * 86_400_000, "1y", "8760h0m0s"),
    ],
)
def test_durations_print_like_model_duration_and_go_duration(ms: int, model: str, go: str) -> None:
    assert format_model_duration(ms) == model
    assert format_go_duration(ms) == go
