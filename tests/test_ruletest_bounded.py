"""Input series are expanded only as far as a test group evaluates (issue 14 item 6)."""

from __future__ import annotations

import io
import resource
from pathlib import Path

import pytest

from sentinel.promtool.ruletest import run_file
from sentinel.promtool.testformat import TestFormatError, parse_series_line

LINES = [
    'up{job="a"} 0x10',
    "x 1+2x5 _x3 stale 4 _ 7-0.1x20",
    "x stalex4 3 _x2 1e3+1e-3x30",
    "x 0.1+0.1x50",
]


@pytest.mark.parametrize("line", LINES)
@pytest.mark.parametrize("limit", [0, 1, 2, 5, 9, 30, 200])
def test_a_limit_keeps_exactly_the_first_values(line: str, limit: int) -> None:
    labels, full = parse_series_line(line, 1)
    bounded_labels, bounded = parse_series_line(line, 1, limit)
    assert bounded_labels == labels
    assert [repr(v) for v in bounded] == [repr(v) for v in full[:limit]]


def test_tokens_past_the_limit_are_still_checked() -> None:
    with pytest.raises(TestFormatError):
        parse_series_line("x 1x3 oops", 1, 2)


def test_a_four_billion_sample_series_evaluated_for_five_minutes(tmp_path: Path) -> None:
    """Expanded whole, this series would need hundreds of GB; bounded, a few samples."""
    (tmp_path / "r.yml").write_text("groups:\n- name: g\n  rules:\n  - alert: Down\n    expr: up == 0\n    for: 2m\n")
    (tmp_path / "t.yml").write_text(
        f"rule_files: [{tmp_path / 'r.yml'}]\n"
        "evaluation_interval: 1m\n"
        "tests:\n- interval: 1m\n  input_series:\n  - series: 'up{job=\"a\"}'\n    values: '0x4000000000'\n"
        "  alert_rule_test:\n  - eval_time: 5m\n    alertname: Down\n"
        "    exp_alerts:\n    - exp_labels: {job: a}\n"
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, err = io.StringIO(), io.StringIO()
    assert run_file(str(tmp_path / "t.yml"), out, err, prometheus_compat=2), err.getvalue()
    assert "SUCCESS" in out.getvalue()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024
