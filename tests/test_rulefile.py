"""Rule files: loading, every promtool error class with its location, and agreement with promtool."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sentinel.rules.rulefile import (
    RuleFileError,
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


def promtool_text(text: str, compat: int = 2) -> list[str]:
    """What `check rules` prints for rules.yml, one string per problem (as promtool 2.42 words it)."""
    with pytest.raises(RuleFileError) as err:
        parse_rule_file(text, "rules.yml", compat)
    return [str(p) for p in err.value.problems for _ in range(p.times)]


# Each case's text is what promtool 2.42 printed for it.
PROMTOOL_TEXTS = {
    "unknown group field": (
        "groups:\n  - name: g\n    intervall: 10s\n    rules: []\n",
        ["rules.yml: yaml: unmarshal errors:\n  line 3: field intervall not found in type rulefmt.RuleGroup"],
    ),
    "unknown rule field": (
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n"
        "      - alert: GpuDown\n        expr: up == 0\n        severity: page\n",
        ["rules.yml: yaml: unmarshal errors:\n  line 8: field severity not found in type rulefmt.RuleNode"],
    ),
    "missing expr": (
        "groups:\n  - name: g\n    rules:\n      - alert: A\n",
        ["""rules.yml: 0:0: group "g", rule 1, "A": field 'expr' must be set in rule"""],
    ),
    "both alert and record": (
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        record: b\n        expr: up\n",
        ["""rules.yml: 5:17: 4:16: group "g", rule 1, "A": only one of 'record' and 'alert' must be set"""],
    ),
    "neither alert nor record": (
        "groups:\n  - name: g\n    rules:\n      - expr: up\n",
        ["""rules.yml: 0:0: group "g", rule 1, "": one of 'record' or 'alert' must be set"""],
    ),
    "unparsable expr": (
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: sum(rate(up[5m]) > 0\n",
        [
            """rules.yml: 5:15: group "g", rule 1, "A": could not parse expression: """
            "1:21: parse error: unclosed left parenthesis"
        ],
    ),
    "bad for": (
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n        for: 5 minutes\n",
        ['rules.yml: not a valid duration string: "5 minutes"'],
    ),
    "bad group interval": (
        "groups:\n  - name: g\n    interval: 1.5s\n    rules: []\n",
        ['rules.yml: not a valid duration string: "1.5s"'],
    ),
    "invalid label name": (
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n"
        "        labels:\n          bad-name: x\n",
        ["""rules.yml: group "g", rule 1, "A": invalid label name: bad-name"""],
    ),
    "bad template": (
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n        annotations:\n"
        '          summary: "{{ $labels.gpu "\n',
        ["""rules.yml: group "g", rule 1, "A": annotation "summary": template: __alert_A:1: unclosed action"""],
    ),
    "for on a recording rule": (
        "groups:\n  - name: g\n    rules:\n      - record: a:b\n        expr: up\n        for: 1m\n",
        ["""rules.yml: 4:17: group "g", rule 1, "a:b": invalid field 'for' in recording rule"""],
    ),
    "invalid recording rule name": (
        "groups:\n  - name: g\n    rules:\n      - record: 'a b'\n        expr: up\n",
        ["""rules.yml: 4:17: group "g", rule 1, "a b": invalid recording rule name: a b"""],
    ),
    "repeated group name": (
        "groups:\n  - name: g\n    rules: []\n  - name: g\n    rules: []\n",
        ['rules.yml: 4:5: groupname: "g" is repeated in the same file'],
    ),
    "empty group name": (
        "groups:\n  - name: ''\n    rules: []\n",
        ["rules.yml: 2:5: Groupname must not be empty"],
    ),
    "every problem at once": (
        "groups:\n  - name: g\n    rules:\n      - alert: A\n      - record: 'x y'\n        expr: up\n"
        "      - alert: C\n        expr: up\n        labels: {bad-name: x}\n",
        [
            """rules.yml: 0:0: group "g", rule 1, "A": field 'expr' must be set in rule""",
            """rules.yml: 5:17: group "g", rule 2, "x y": invalid recording rule name: x y""",
            """rules.yml: group "g", rule 3, "C": invalid label name: bad-name""",
        ],
    ),
    "group labels are newer than 2.42": (
        "groups:\n  - name: g\n    labels: {bad-name: x}\n    rules: []\n",
        ["rules.yml: yaml: unmarshal errors:\n  line 3: field labels not found in type rulefmt.RuleGroup"],
    ),
    "query_offset is newer than 2.42": (
        "groups:\n  - name: g\n    query_offset: 1m\n    rules: []\n",
        ["rules.yml: yaml: unmarshal errors:\n  line 3: field query_offset not found in type rulefmt.RuleGroup"],
    ),
    "yaml syntax error, reported for both of Prometheus's decodes": (
        "groups:\n  - name: g\n    rules: [\n",
        ["rules.yml: yaml: line 3: did not find expected node content"] * 2,
    ),
    "merged rule keeps its own expr": (
        "groups:\n- name: g\n  rules:\n  - &a {alert: A, expr: up == 0}\n  - <<: *a\n    alert: B\n"
        '  - <<: *a\n    alert: C\n    expr: "up >"\n',
        [
            """rules.yml: 9:11: group "g", rule 3, "C": could not parse expression: """
            "1:5: parse error: unexpected end of input"
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(PROMTOOL_TEXTS))
def test_problems_read_as_promtool_prints_them(case: str) -> None:
    text, expected = PROMTOOL_TEXTS[case]
    assert promtool_text(text) == expected


def test_problems_keep_the_line_and_rule_for_the_daemons_log() -> None:
    with pytest.raises(RuleFileError) as err:
        parse_rule_file(PROMTOOL_TEXTS["every problem at once"][0], "rules.yml", 2)
    assert [(p.line, p.group, p.rule) for p in err.value.problems] == [
        (4, "g", "rule 1 (alert 'A')"),
        (5, "g", "rule 2 (record 'x y')"),
        (7, "g", "rule 3 (alert 'C')"),
    ]


def test_prometheus_3_accepts_what_2_42_refuses() -> None:
    """UTF-8 names, group labels and query_offset are Prometheus 3's rulefmt."""
    groups = parse_rule_file(
        "groups:\n  - name: g\n    query_offset: 1m\n    labels: {team: infra}\n    rules:\n"
        "      - record: 'a b'\n        expr: up\n        labels: {bad-name: x}\n",
        "rules.yml",
    )
    assert groups[0].query_offset_ms == 60_000 and groups[0].labels == {"team": "infra"}
    assert groups[0].rules[0].name == "a b" and groups[0].rules[0].labels == {"bad-name": "x"}
    assert promtool_text("groups: [{name: g, rules: [{record: 'a{b}', expr: up}]}]\n", 3) == [
        """rules.yml: 1:37: group "g", rule 1, "a{b}": braces present in the recording rule name; """
        "should it be in expr?: a{b}"
    ]


def test_merge_keys_give_each_rule_its_own_fields_and_text() -> None:
    groups = parse_rule_file(
        "groups:\n- name: g\n  rules:\n  - &a {alert: A, expr: up == 0, labels: {page: yes}}\n"
        "  - <<: *a\n    alert: B\n  - <<: [{expr: 'x > 1', for: 5m}, *a]\n    alert: C\n",
        "rules.yml",
    )
    a, b, c = groups[0].rules
    assert (a.name, a.expr, a.labels) == ("A", "up == 0", {"page": "yes"})
    assert (b.name, b.expr, b.labels) == ("B", "up == 0", {"page": "yes"})
    assert (c.name, c.expr, c.for_ms, c.labels) == ("C", "x > 1", 300_000, {"page": "yes"})


def test_an_alias_as_expr_is_the_anchor_name_as_in_prometheus() -> None:
    # yaml.v3 gives a yaml.Node field the alias node itself, whose value is its name.
    groups = parse_rule_file(
        "groups:\n- name: g\n  rules:\n  - {record: a, expr: &e 'up == 1'}\n  - {record: b, expr: *e}\n", "rules.yml"
    )
    assert [r.expr for r in groups[0].rules] == ["up == 1", "e"]


def test_alert_names_are_not_restricted_to_metric_names() -> None:
    groups = parse_rule_file("groups: [{name: g, rules: [{alert: 'GPU down', expr: up == 0}]}]\n", "r.yml")
    assert groups[0].rules[0].name == "GPU down"


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
        [sys.executable, "-m", "sentinel", "check", "rules", "--prometheus-compat", "2", path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert theirs.returncode in (0, 1), theirs.stderr
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
