"""Prometheus's own PromQL conformance scripts, run through Sentinel's engine.

The scripts live outside the repository (../shared/promql-testdata); the pass count
must not drop below the recorded baseline, and no eval may be skipped except for
native histograms or syntax promql-parser cannot parse.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sentinel.promtool.promqltest import Report, main, run_files, run_script
from tests.conftest import IN_CI

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "promql-testdata"
BASELINE = Path(__file__).with_name("promql_conformance_baseline.json")


def _scripts() -> list[Path]:
    files = sorted(TESTDATA.glob("*.test"))
    if not files:
        message = f"PromQL conformance data not found in {TESTDATA} (expected the shared promql-testdata checkout)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return files


@pytest.fixture(scope="module")
def report() -> Report:
    return run_files(_scripts())


def test_pass_count_does_not_drop_below_baseline(report: Report) -> None:
    baseline = json.loads(BASELINE.read_text())
    failures = "\n".join(f"{o.file}:{o.line}: {o.expr}: {o.message}" for o in report.outcomes if o.status == "failed")
    assert report.passed >= baseline["passed"], f"{report.summary()} (baseline {baseline})\n{failures}"
    assert report.failed <= baseline["failed"], failures


def test_at_least_95_percent_of_evaluated_scripts_pass(report: Report) -> None:
    assert report.passed >= 0.95 * (report.passed + report.failed)


def test_only_native_histograms_or_unparseable_syntax_are_skipped(report: Report) -> None:
    reasons = {o.message for o in report.outcomes if o.status == "skipped"}
    allowed = ("needs native histograms", "promql-parser cannot parse")
    assert all(reason.startswith(allowed) for reason in reasons), reasons


def test_cli_prints_failures_and_summary_and_exits_nonzero_on_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "mini.test"
    script.write_text(
        "load 1m\n"
        '  up{job="a"} 1 0 1\n'
        "\n"
        "eval instant at 2m up\n"
        '  up{job="a"} 1\n'
        "\n"
        "eval instant at 2m up\n"
        '  up{job="a"} 5\n'
        "\n"
        'eval instant at 2m {__name__=~"h.*"}\n'
        "  h {{schema:0 sum:1 count:1}}\n"
    )
    assert main([str(script)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {script}:7: up" in out
    assert "SKIP" in out and "native histograms" in out
    assert out.rstrip().endswith("1 passed, 1 failed, 1 skipped")


def test_runner_expands_series_notation_and_checks_range_results() -> None:
    report = run_script(
        "load 10s\n"
        "  m 1+1x3 _ stale 0x1\n"
        '  n{a="x"} 1\n'
        '  n{a="y"} 1\n'
        "\n"
        "eval range from 0 to 60s step 10s m\n"
        "  m 1 2 3 4 4 _ 0\n"
        "\n"
        "eval instant at 30s m\n"
        "  expect ordered\n"
        "  m 4\n"
        "\n"
        "eval instant at 0 time() + 1\n"
        "  1\n"
        "\n"
        'eval instant at 0 "x"\n'
        '  expect string "x"\n'
        "\n"
        "eval instant at 0 m + on() n\n"
        "  expect fail msg: found duplicate series for the match group {} on the right hand-side of the operation: "
        '[{__name__="n", a="x"}, {__name__="n", a="y"}];many-to-many matching not allowed: matching labels must '
        "be unique on one side\n"
    )
    assert [o.status for o in report.outcomes] == ["passed"] * 5, report.outcomes
