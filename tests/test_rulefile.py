"""Rule files: loading, every promtool error class with its location, and agreement with promtool."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sentinel.rules.rulefile import (
    RuleFileError,
    RuleProblem,
    load_rule_files,
    parse_prom_duration,
    parse_rule_file,
)
from tests.conftest import require_tool

VALID = """\
groups:
  - name: gpu
    interval: 10s
    limit: 50
    rules:
      - record: gpu:utilization:avg5m
        expr: avg_over_time(sentinel_gpu_utilization_ratio[5m])
      - alert: GpuHot
        expr: sentinel_gpu_temperature_celsius > 85
        for: 1m
        keep_firing_for: 30s
        labels:
          severity: warning
        annotations:
          summary: "GPU {{ $labels.gpu }} at {{ $value | printf \\"%.0f\\" }} C"
  - name: xid
    rules:
      - alert: XidStorm
        expr: increase(sentinel_gpu_xid_errors_total[5m]) > 3
"""


def problems(text: str, file: str = "rules.yml") -> list[RuleProblem]:
    with pytest.raises(RuleFileError) as err:
        parse_rule_file(textwrap.dedent(text), file)
    return err.value.problems


def one_problem(text: str) -> RuleProblem:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# -- valid files -------------------------------------------------------------------------------


def test_valid_file_loads_groups_and_rules_with_their_fields() -> None:
    groups = parse_rule_file(VALID, "gpu.yml")
    assert [g.name for g in groups] == ["gpu", "xid"]
    gpu = groups[0]
    assert gpu.interval_ms == 10_000 and gpu.limit == 50 and gpu.file == "gpu.yml"
    record, alert = gpu.rules
    assert record.kind == "record" and record.name == "gpu:utilization:avg5m" and not record.is_alert
    assert alert.is_alert and alert.name == "GpuHot" and alert.line == 8 and alert.index == 1
    assert alert.for_ms == 60_000 and alert.keep_firing_for_ms == 30_000
    assert alert.labels == {"severity": "warning"}
    assert alert.annotations["summary"].startswith("GPU {{ $labels.gpu }}")
    assert groups[1].interval_ms is None  # the engine's default


def test_files_load_through_globs_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.rules.yml").write_text("groups: [{name: b, rules: [{record: b, expr: up}]}]\n")
    (tmp_path / "a.rules.yml").write_text("groups: [{name: a, rules: [{record: a, expr: up}]}]\n")
    (tmp_path / "empty.rules.yml").write_text("")
    groups = load_rule_files([str(tmp_path / "*.rules.yml")])
    assert [g.name for g in groups] == ["a", "b"]
    assert groups[0].file == str(tmp_path / "a.rules.yml")


def test_problems_of_several_files_are_reported_together(tmp_path: Path) -> None:
    (tmp_path / "one.yml").write_text("groups: [{name: a, rules: [{alert: A}]}]\n")
    (tmp_path / "two.yml").write_text("groups: [{name: b, rules: [{record: b}]}]\n")
    with pytest.raises(RuleFileError) as err:
        load_rule_files([str(tmp_path / "one.yml"), str(tmp_path / "two.yml"), str(tmp_path / "missing.yml")])
    assert [Path(p.file).name for p in err.value.problems] == ["one.yml", "two.yml", "missing.yml"]
    assert "cannot read" in err.value.problems[2].message


def test_values_keep_their_source_text_as_prometheus_does() -> None:
    # PyYAML would make `yes` a boolean and `1.50` the float 1.5; Go keeps the text.
    groups = parse_rule_file(
        textwrap.dedent(
            """\
            groups:
              - name: 5
                rules:
                  - alert: 123
                    expr: up == 0
                    for: 0
                    labels: {page: yes, ratio: 1.50, empty: }
            """
        ),
        "r.yml",
    )
    rule = groups[0].rules[0]
    assert groups[0].name == "5" and rule.name == "123" and rule.for_ms == 0
    assert rule.labels == {"page": "yes", "ratio": "1.50", "empty": ""}


def test_recording_rule_accepts_zero_for_and_literal_template_text() -> None:
    groups = parse_rule_file(
        "groups: [{name: g, rules: [{record: a, expr: up, for: 0s, keep_firing_for: 0s, labels: {x: '{{ '}}]}]\n",
        "r.yml",
    )
    assert groups[0].rules[0].labels == {"x": "{{ "}


def test_negative_group_limit_means_no_limit() -> None:
    assert parse_rule_file("groups: [{name: g, limit: -1, rules: []}]\n", "r.yml")[0].limit == -1


@pytest.mark.parametrize(
    ("text", "ms"),
    [("0", 0), ("500ms", 500), ("1m30s", 90_000), ("1h", 3_600_000), ("1y2w", (365 + 14) * 86_400_000)],
)
def test_prometheus_durations_parse(text: str, ms: int) -> None:
    assert parse_prom_duration(text) == ms


@pytest.mark.parametrize("text", ["", "1.5s", "5 minutes", "-1m", "1s1m", "90", 90])
def test_invalid_prometheus_durations_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match="not a valid duration string"):
        parse_prom_duration(text)


# -- every error class names file, line, group and rule -----------------------------------------


def test_unknown_field_in_a_group_is_reported_at_its_line() -> None:
    p = one_problem(
        """\
        groups:
          - name: g
            intervall: 10s
            rules: []
        """
    )
    assert (p.file, p.line, p.group, p.rule) == ("rules.yml", 3, "g", None)
    assert p.message == "field intervall not found in type rulefmt.RuleGroup"


def test_unknown_field_in_a_rule_names_the_rule() -> None:
    p = one_problem(
        """\
        groups:
          - name: g
            rules:
              - alert: A
                expr: up == 0
              - alert: GpuDown
                expr: up == 0
                severity: page
        """
    )
    assert (p.line, p.group, p.rule) == (8, "g", "rule 2 (alert 'GpuDown')")
    assert p.message == "field severity not found in type rulefmt.RuleNode"
    assert str(p) == "rules.yml:8: group 'g', rule 2 (alert 'GpuDown'): " + p.message


def test_missing_expr() -> None:
    p = one_problem(
        """\
        groups:
          - name: g
            rules:
              - alert: A
        """
    )
    assert (p.line, p.group, p.rule, p.message) == (4, "g", "rule 1 (alert 'A')", "field 'expr' must be set in rule")


def test_both_alert_and_record() -> None:
    p = one_problem(
        """\
        groups:
          - name: g
            rules:
              - alert: A
                record: b
                expr: up
        """
    )
    assert (p.line, p.group) == (4, "g") and "rule 1" in (p.rule or "")
    assert p.message == "only one of 'record' and 'alert' must be set"


def test_neither_alert_nor_record() -> None:
    p = one_problem(
        """\
        groups:
          - name: g
            rules:
              - expr: up
        """
    )
    assert (p.line, p.group, p.rule) == (4, "g", "rule 1")
    assert p.message == "one of 'record' or 'alert' must be set"


def test_unparsable_expr_carries_the_parsers_message() -> None:
    p = one_problem(
        """\
        groups:
          - name: g
            rules:
              - alert: A
                expr: sum(rate(up[5m]) > 0
        """
    )
    assert (p.line, p.group, p.rule) == (5, "g", "rule 1 (alert 'A')")
    assert p.message.startswith("could not parse expression: ")
    assert "unclosed left parenthesis" in p.message and "sum(rate(up[5m]) > 0" in p.message


@pytest.mark.parametrize(
    ("field", "value", "line"),
    [("for", "5 minutes", 6), ("keep_firing_for", "1.5m", 6), ("for", "90", 6)],
)
def test_bad_rule_durations(field: str, value: str, line: int) -> None:
    p = one_problem(
        f"""\
        groups:
          - name: g
            rules:
              - alert: A
                expr: up == 0
                {field}: {value}
        """
    )
    assert (p.line, p.group, p.rule) == (line, "g", "rule 1 (alert 'A')")
    assert p.message == f"not a valid duration string: {value!r}"


def test_bad_group_interval() -> None:
    p = one_problem(
        """\
        groups:
          - name: g
            interval: 1.5s
            rules: []
        """
    )
    assert (p.line, p.group, p.rule) == (3, "g", None)
    assert "not a valid duration string" in p.message


@pytest.mark.parametrize(
    ("section", "name", "message"),
    [
        ("labels", "bad-name", "invalid label name: bad-name"),
        ("labels", "__name__", "invalid label name: __name__"),
        ("annotations", "0summary", "invalid annotation name: 0summary"),
    ],
)
def test_invalid_label_and_annotation_names(section: str, name: str, message: str) -> None:
    p = one_problem(
        f"""\
        groups:
          - name: g
            rules:
              - alert: A
                expr: up == 0
                {section}:
                  {name}: x
        """
    )
    assert (p.line, p.group, p.rule, p.message) == (7, "g", "rule 1 (alert 'A')", message)


def test_invalid_group_label_name() -> None:
    p = one_problem("groups:\n  - name: g\n    labels: {bad-name: x}\n    rules: []\n")
    assert (p.line, p.group, p.message) == (3, "g", "invalid label name: bad-name")


@pytest.mark.parametrize("section", ["labels", "annotations"])
def test_bad_template_in_alerting_rule(section: str) -> None:
    p = one_problem(
        f"""\
        groups:
          - name: g
            rules:
              - alert: A
                expr: up == 0
                {section}:
                  summary: "{{{{ $labels.gpu "
        """
    )
    assert (p.line, p.group, p.rule) == (7, "g", "rule 1 (alert 'A')")
    assert p.message.startswith(f"template: {section}.summary:") and "unclosed action" in p.message


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("annotations", "{summary: x}", "invalid field 'annotations' in recording rule"),
        ("for", "1m", "invalid field 'for' in recording rule"),
        ("keep_firing_for", "1m", "invalid field 'keep_firing_for' in recording rule"),
    ],
)
def test_alert_only_fields_on_recording_rules(field: str, value: str, message: str) -> None:
    p = one_problem(
        f"""\
        groups:
          - name: g
            rules:
              - record: a:b
                expr: up
                {field}: {value}
        """
    )
    assert (p.line, p.group, p.rule, p.message) == (6, "g", "rule 1 (record 'a:b')", message)


def test_invalid_recording_rule_name() -> None:
    p = one_problem("groups:\n  - name: g\n    rules:\n      - record: 'a b'\n        expr: up\n")
    assert (p.line, p.rule, p.message) == (4, "rule 1 (record 'a b')", "invalid recording rule name: a b")


def test_alert_names_are_not_restricted_to_metric_names() -> None:
    groups = parse_rule_file("groups: [{name: g, rules: [{alert: 'GPU down', expr: up == 0}]}]\n", "r.yml")
    assert groups[0].rules[0].name == "GPU down"


def test_duplicate_group_names() -> None:
    p = one_problem(
        """\
        groups:
          - name: g
            rules: []
          - name: g
            rules: []
        """
    )
    assert (p.line, p.group, p.message) == (4, "g", 'groupname: "g" is repeated in the same file')


def test_empty_group_name() -> None:
    p = one_problem("groups:\n  - name: ''\n    rules: []\n")
    assert (p.line, p.message) == (2, "groupname must not be empty")


def test_yaml_syntax_error_names_file_and_line() -> None:
    p = one_problem(
        """\
        groups:
          - name: g
            rules:
              - record: a
                expr: [up
        """
    )
    assert p.file == "rules.yml" and p.line is not None and p.line >= 5
    assert (p.group, p.rule) == (None, None)


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    found = problems(
        """\
        groups:
          - name: g
            rules:
              - alert: A
              - record: 'x y'
                expr: up
              - alert: C
                expr: up
                for: soon
        """
    )
    assert [(p.line, p.rule) for p in found] == [
        (4, "rule 1 (alert 'A')"),
        (5, "rule 2 (record 'x y')"),
        (9, "rule 3 (alert 'C')"),
    ]


# -- agreement with promtool ----------------------------------------------------------------------

# Each file, as promtool 2.42 judges it (0 valid, 1 invalid). Fields newer than 2.42
# (group `labels`, `query_offset`) are left out: that promtool refuses them.
AGREEMENT_CASES = {
    "valid.yml": VALID,
    "empty.yml": "",
    "no_groups.yml": "groups: []\n",
    "numbers_as_names.yml": "groups: [{name: 5, rules: [{alert: 123, expr: up, for: 0}]}]\n",
    "record_zero_for.yml": "groups: [{name: g, rules: [{record: a, expr: up, for: 0s}]}]\n",
    "record_literal_braces.yml": "groups: [{name: g, rules: [{record: a, expr: up, labels: {x: '{{ '}}]}]\n",
    "negative_limit.yml": "groups: [{name: g, limit: -1, rules: []}]\n",
    "null_label.yml": "groups: [{name: g, rules: [{alert: A, expr: up, labels: {x: }}]}]\n",
    "spaced_alert_name.yml": "groups: [{name: g, rules: [{alert: 'GPU down', expr: up}]}]\n",
    "unknown_group_field.yml": "groups: [{name: g, intervall: 1m, rules: []}]\n",
    "unknown_rule_field.yml": "groups: [{name: g, rules: [{alert: A, expr: up, severity: page}]}]\n",
    "missing_expr.yml": "groups: [{name: g, rules: [{alert: A}]}]\n",
    "alert_and_record.yml": "groups: [{name: g, rules: [{alert: A, record: b, expr: up}]}]\n",
    "neither.yml": "groups: [{name: g, rules: [{expr: up}]}]\n",
    "bad_expr.yml": "groups: [{name: g, rules: [{alert: A, expr: 'sum(up'}]}]\n",
    "bad_for.yml": "groups: [{name: g, rules: [{alert: A, expr: up, for: 5 minutes}]}]\n",
    "bad_interval.yml": "groups: [{name: g, interval: 1.5s, rules: []}]\n",
    "bad_label_name.yml": "groups: [{name: g, rules: [{alert: A, expr: up, labels: {bad-name: x}}]}]\n",
    "bad_annotation_name.yml": "groups: [{name: g, rules: [{alert: A, expr: up, annotations: {0x: y}}]}]\n",
    "bad_template.yml": "groups: [{name: g, rules: [{alert: A, expr: up, annotations: {s: '{{ $labels.x '}}]}]\n",
    "record_annotations.yml": "groups: [{name: g, rules: [{record: a, expr: up, annotations: {x: y}}]}]\n",
    "record_for.yml": "groups: [{name: g, rules: [{record: a, expr: up, for: 1m}]}]\n",
    "bad_record_name.yml": "groups: [{name: g, rules: [{record: 'a b', expr: up}]}]\n",
    "duplicate_groups.yml": "groups: [{name: g, rules: []}, {name: g, rules: []}]\n",
    "empty_group_name.yml": "groups: [{name: '', rules: []}]\n",
    "yaml_error.yml": "groups:\n  - name: g\n    rules: [\n",
    "duplicate_key.yml": "groups: [{name: g, rules: [{alert: A, expr: up, expr: down}]}]\n",
    "unknown_top_field.yml": "groups: []\nother: 1\n",
    "limit_string.yml": "groups: [{name: g, limit: five, rules: []}]\n",
}


@pytest.fixture(scope="module")
def agreement_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("agreement")
    for name, text in AGREEMENT_CASES.items():
        (root / name).write_text(text)
    return root


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(AGREEMENT_CASES))
def test_sentinel_check_rules_agrees_with_promtool(agreement_dir: Path, name: str) -> None:
    promtool = require_tool("promtool", "prometheus")
    path = str(agreement_dir / name)
    theirs = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True, timeout=60)
    ours = subprocess.run(
        [sys.executable, "-m", "sentinel", "check", "rules", path], capture_output=True, text=True, timeout=60
    )
    assert theirs.returncode in (0, 1), theirs.stderr
    assert ours.returncode == theirs.returncode, (
        f"promtool={theirs.returncode} sentinel={ours.returncode}\n{theirs.stdout}{theirs.stderr}\n"
        f"---\n{ours.stdout}{ours.stderr}"
    )
    if ours.returncode:
        assert name in ours.stderr  # the file is named next to its problems
