"""Alert templates render as Prometheus renders them: Go's text/template plus Prometheus's functions.

Expected strings come from prometheus/template/template_test.go where it has them, and
otherwise from running the same template through a real Prometheus (promtool); the
integration test at the bottom repeats that comparison whenever promtool is installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.gotemplate import QueryFunc, TemplateContext, TemplateError, go_format, parse, render
from tests.conftest import require_tool

LABELS = {"instance": "gpu-node-1:9400", "job": "dcgm", "gpu": "3"}


class FakeSample:
    """What a query engine returns: labels as name/value pairs, and a value."""

    def __init__(self, labels: Mapping[str, str], value: float):
        self.labels = tuple(sorted(labels.items()))
        self.value = value


def expand(
    text: str,
    value: float = 0.5,
    labels: Mapping[str, str] | None = None,
    external_labels: Mapping[str, str] | None = None,
    external_url: str = "",
    query: QueryFunc | None = None,
) -> str:
    ctx = TemplateContext(
        labels=LABELS if labels is None else labels,
        value=value,
        external_labels=external_labels or {},
        external_url=external_url,
        query=query,
    )
    return render(text, ctx)


def error_of(text: str, query: QueryFunc | None = None) -> TemplateError:
    with pytest.raises(TemplateError) as info:
        expand(text, query=query)
    return info.value


# --- typical alert annotations -------------------------------------------------------------------


def test_instance_down_annotation_reads_labels() -> None:
    assert expand("{{ $labels.instance }} of job {{ $labels.job }} is down") == "gpu-node-1:9400 of job dcgm is down"


def test_gpu_utilisation_annotation_humanizes_the_value_as_a_percentage() -> None:
    assert expand("GPU {{ $labels.gpu }} at {{ $value | humanizePercentage }}", value=0.9731) == "GPU 3 at 97.31%"


def test_printf_formats_the_value_with_two_decimals() -> None:
    assert expand('{{ printf "%.2f" $value }}', value=2 / 3) == "0.67"


@pytest.mark.parametrize(("value", "severity"), [(0.95, "critical"), (0.5, "warning")])
def test_severity_label_template_branches_on_the_value(value: float, severity: str) -> None:
    assert expand("{{ if gt $value 0.9 }}critical{{ else }}warning{{ end }}", value=value) == severity


def test_range_over_labels_visits_keys_in_sorted_order() -> None:
    text = "{{ range $k, $v := $labels }}{{ $k }}={{ $v }} {{ end }}"
    assert expand(text) == "gpu=3 instance=gpu-node-1:9400 job=dcgm "


def test_dot_forms_match_the_preamble_variables() -> None:
    text = "{{ .Labels.job }} {{ .Value }} {{ .ExternalLabels.cluster }} {{ .ExternalURL }} {{ $.Labels.gpu }}"
    out = expand(text, value=0.25, external_labels={"cluster": "eu1"}, external_url="http://prom:9090/")
    assert out == "dcgm 0.25 eu1 http://prom:9090/ 3"
    out = expand("{{ $externalLabels.cluster }} {{ $externalURL }}", external_labels={"cluster": "eu1"})
    assert out == "eu1 "


def test_missing_label_renders_as_empty_string() -> None:
    assert expand('[{{ $labels.nope }}][{{ .Labels.nope }}][{{ index $labels "nope" }}]') == "[][][]"


def test_index_reads_a_label_whose_name_is_not_an_identifier() -> None:
    assert expand('{{ index $labels "key-with-dash" }}', labels={"key-with-dash": "x"}) == "x"


def test_text_without_actions_renders_unchanged() -> None:
    assert expand("plain text") == "plain text"


# --- printing values as Go's %v does -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "printed"),
    [
        (0.5, "0.5"),
        (1e6, "1e+06"),
        (12.0, "12"),
        (123456.0, "123456"),
        (1234567.0, "1.234567e+06"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (0.1 + 0.2, "0.30000000000000004"),
        (-0.0, "-0"),
        (math.nan, "NaN"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
    ],
)
def test_value_prints_like_go_percent_v(value: float, printed: str) -> None:
    assert expand("{{ $value }}", value=value) == printed


def test_constants_print_as_go_prints_them() -> None:
    text = "{{ 1 }}|{{ 1.0 }}|{{ 1e3 }}|{{ 0x1F }}|{{ 017 }}|{{ 0b101 }}|{{ 1_000 }}|{{ 'a' }}|{{ .5 }}|{{ true }}"
    assert expand(text) == "1|1|1000|31|15|5|1000|97|0.5|true"


def test_maps_print_with_sorted_keys() -> None:
    assert expand("{{ $labels }}", labels={"b": "2", "a": "1"}) == "map[a:1 b:2]"


@pytest.mark.parametrize(
    ("verb", "value", "out"),
    [
        ("%v", 0.5, "0.5"),
        ("%v", 1e6, "1e+06"),
        ("%v", 3.14, "3.14"),
        ("%v", 5.0, "5"),
        ("%s", "x", "x"),
        ("%d", 42, "42"),
        ("%05d", -42, "-0042"),
        ("%+d", 5, "+5"),
        ("%x", 255, "ff"),
        ("%X", "hi", "6869"),
        ("% x", "hi", "68 69"),
        ("%f", 1.5, "1.500000"),
        ("%.2f", 0.005, "0.01"),
        ("%8.3f", -3.14159, "  -3.142"),
        ("%08.3f", -3.14159, "-003.142"),
        ("%-8.2f|", 2.5, "2.50    |"),
        ("%g", 1e-7, "1e-07"),
        ("%.3g", 1234567.0, "1.23e+06"),
        ("%e", 1234.5, "1.234500e+03"),
        ("%G", 1e-7, "1E-07"),
        ("%6.2v", 3.14159, "   3.1"),
        ("%x", 1.0, "0x1p+00"),
        ("%q", "a\n", '"a\\n"'),
        ("%q", 9731, "'☃'"),
        ("%-6q|", "z", '"z"   |'),
        ("%05s", "ab", "000ab"),
        ("%.2s", "abc", "ab"),
        ("%t", True, "true"),
        ("%c", 65, "A"),
        ("%U", 65, "U+0041"),
        ("%T", 1.5, "float64"),
        ("%v", math.inf, "+Inf"),
        ("%f", math.nan, "NaN"),
    ],
)
def test_go_format_matches_go_printf(verb: str, value: object, out: str) -> None:
    assert go_format(verb, value) == out


@pytest.mark.parametrize(
    ("text", "out"),
    [
        ('{{ printf "%d" 1.5 }}', "%!d(float64=1.5)"),
        ('{{ printf "%.2f" 1 }}', "%!f(int=01)"),
        ('{{ printf "%s" 1 }}', "%!s(int=1)"),
        ('{{ printf "%d %d" 1 }}', "1 %!d(MISSING)"),
        ('{{ printf "x" 1 "a" }}', "x%!(EXTRA int=1, string=a)"),
        ('{{ printf "%" }}', "%!(NOVERB)"),
        ('{{ printf "%[2]d %[1]d" 1 2 }}', "2 1"),
        ('{{ printf "%[5]d" 1 }}', "%!d(BADINDEX)"),
        ('{{ printf "%*d|%.*f" 4 7 2 3.14159 }}', "   7|3.14"),
        ('{{ printf "%s %v" nil nil }}', "%!s(<nil>) <nil>"),
        ('{{ printf "100%%" }}', "100%"),
    ],
)
def test_printf_mismatches_print_go_error_forms_instead_of_failing(text: str, out: str) -> None:
    assert expand(text) == out


def test_print_spaces_operands_only_between_non_strings() -> None:
    assert expand('{{ print 1 2 "a" "b" 3 nil }}|{{ println 1 "a" }}') == "1 2ab3 <nil>|1 a\n"


# --- Prometheus functions (prometheus/template/template_test.go) -----------------------------------


@pytest.mark.parametrize(
    ("arg", "out"),
    [
        ("0", "0"),
        ("1", "1"),
        ("1234", "1.234k"),
        ("1e6", "1M"),
        ("1234567.0", "1.235M"),
        ("0.12", "120m"),
        ("0.001", "1m"),
        ("-1e-9", "-1n"),
        ("-1234.5", "-1.234k"),
        ("9223372036854775807", "9.223E"),
        ("1e30", "1e+06Y"),
        ('"1234567.0"', "1.235M"),
        ('"NaN"', "NaN"),
        ('"Inf"', "+Inf"),
        ('"-Inf"', "-Inf"),
    ],
)
def test_humanize_uses_si_prefixes_with_four_significant_digits(arg: str, out: str) -> None:
    assert expand(f"{{{{ humanize {arg} }}}}") == out


def test_humanize_of_nan_and_inf_values() -> None:
    assert expand("{{ humanize $value }}", value=math.nan) == "NaN"
    assert expand("{{ humanize $value }}", value=math.inf) == "+Inf"


@pytest.mark.parametrize(
    ("arg", "out"),
    [("0", "0"), ("1", "1"), ("0.12", "0.12"), ("1024", "1ki"), ("1048576", "1Mi"), ("1234567", "1.177Mi")],
)
def test_humanize1024_uses_binary_prefixes(arg: str, out: str) -> None:
    assert expand(f"{{{{ humanize1024 {arg} }}}}") == out


@pytest.mark.parametrize(
    ("arg", "out"),
    [
        ("0", "0s"),
        ("0.1", "100ms"),
        (".0001", "100us"),
        (".12345", "123.5ms"),
        ("1", "1s"),
        ("1.2345", "1.234s"),
        ("2.5", "2.5s"),
        ("12.345", "12.35s"),
        ("60", "1m 0s"),
        ("90", "1m 30s"),
        ("60.5", "1m 0s"),
        ("899.99", "14m 59s"),
        ("3600", "1h 0m 0s"),
        ("86400", "1d 0h 0m 0s"),
        ("90061", "1d 1h 1m 1s"),
        ("1234567", "14d 6h 56m 7s"),
        ("-1", "-1s"),
        ("-0.5", "-500ms"),
        ("-183845", "-2d 3h 4m 5s"),
        ('"3600"', "1h 0m 0s"),
        ('"NaN"', "NaN"),
    ],
)
def test_humanize_duration_formats_seconds_like_prometheus(arg: str, out: str) -> None:
    assert expand(f"{{{{ humanizeDuration {arg} }}}}") == out


@pytest.mark.parametrize(
    ("arg", "out"),
    [
        ("0.1234", "12.34%"),
        ("0.1234567", "12.35%"),
        ("-0.22222", "-22.22%"),
        ("0.0", "0%"),
        ("1.23456", "123.5%"),
        ("1234567", "1.235e+08%"),
        ('"0.1234567"', "12.35%"),
    ],
)
def test_humanize_percentage_scales_by_one_hundred(arg: str, out: str) -> None:
    assert expand(f"{{{{ {arg} | humanizePercentage }}}}") == out


@pytest.mark.parametrize(
    ("arg", "out"),
    [
        ("1435065584.128", "2015-06-23 13:19:44.128 +0000 UTC"),
        ('"1435065584.128"', "2015-06-23 13:19:44.128 +0000 UTC"),
        ("0", "1970-01-01 00:00:00 +0000 UTC"),
        ("-1", "1969-12-31 23:59:59 +0000 UTC"),
        ("-0.5", "1969-12-31 23:59:59.5 +0000 UTC"),
        ("9223372036", "2262-04-11 23:47:16 +0000 UTC"),
        ('"NaN"', "NaN"),
    ],
)
def test_humanize_timestamp_prints_go_time_in_utc(arg: str, out: str) -> None:
    assert expand(f"{{{{ humanizeTimestamp {arg} }}}}") == out


def test_to_time_supports_go_time_methods() -> None:
    assert expand('{{ (1435065584.128 | toTime).Format "2006" }}') == "2015"
    layout = "2006-01-02T15:04:05.000Z07:00 Mon Jan _2 3PM"
    assert expand(f'{{{{ (toTime 1435065584.128).Format "{layout}" }}}}') == "2015-06-23T13:19:44.128Z Tue Jun 23 1PM"
    assert expand("{{ (toTime 1.5).Unix }}|{{ toTime 1.5 }}") == "1|1970-01-01 00:00:01.5 +0000 UTC"


def test_humanize_of_text_that_is_not_a_number_fails_like_strconv() -> None:
    err = error_of('{{ humanize "one" }}')
    assert err.detail == (
        'executing "template" at <humanize "one">: error calling humanize: '
        'strconv.ParseFloat: parsing "one": invalid syntax'
    )
    assert (err.line, err.col, err.phase) == (1, 4, "exec")


def test_humanize_timestamp_refuses_times_beyond_int64_nanoseconds() -> None:
    err = error_of("{{ humanizeTimestamp 1e300 }}")
    assert err.detail.endswith("1e+300 cannot be represented as a nanoseconds timestamp since it overflows int64")


@pytest.mark.parametrize(
    ("text", "out"),
    [
        ('{{ "aa bb CC" | title }}', "Aa Bb CC"),
        ('{{ "don\'t stop" | title }}', "Don't Stop"),
        ('{{ "aa bb CC" | toUpper }}', "AA BB CC"),
        ('{{ "aA bB CC" | toLower }}', "aa bb cc"),
        ('{{ "straße" | toUpper }}', "STRAßE"),
        ('{{ match "a+" "aa" }} {{ match "a+" "b" }}', "true false"),
        ('{{ reReplaceAll "(a)b" "x$1" "ab" }}', "xa"),
        ('{{ reReplaceAll "x*" "-" "abxd" }}', "-a-b-d-"),
        ('{{ reReplaceAll "(?P<user>\\\\w+)@(\\\\w+)" "${user} at $2" "bob@host" }}', "bob at host"),
        ('{{ match "^a$" "a\\n" }}', "false"),
        ('{{ graphLink "rate(x[5m]) > 1" }}', "/graph?g0.expr=rate%28x%5B5m%5D%29+%3E+1&g0.tab=0"),
        ('{{ tableLink "up" }}', "/graph?g0.expr=up&g0.tab=1"),
        ('{{ printf "%0.2f" (parseDuration "1h2m10ms") }}', "3720.01"),
        ('{{ parseDuration "1w2d" }}', "777600"),
        ('{{ define "x" }}{{.arg0}} {{.arg1}}{{ end }}{{ template "x" (args 1 "2") }}', "1 2"),
        ('{{ "<b>" | safeHtml }}', "<b>"),
        ("{{ html \"<a href='x'>&\" }}", "&lt;a href=&#39;x&#39;&gt;&amp;"),
        ('{{ js "a\'b<" }}', "a\\'b\\u003C"),
        ('{{ urlquery "a b&c/é" }}', "a+b%26c%2F%C3%A9"),
    ],
)
def test_string_functions_match_prometheus(text: str, out: str) -> None:
    assert expand(text) == out


@pytest.mark.parametrize(
    ("address", "port_stripped", "domain_stripped"),
    [
        ("foo.example.com", "foo.example.com", "foo"),
        ("foo.example.com:12345", "foo.example.com", "foo:12345"),
        ("192.0.2.1", "192.0.2.1", "192.0.2.1"),
        ("192.0.2.1:12345", "192.0.2.1", "192.0.2.1:12345"),
        ("2001:0DB8::1", "2001:0DB8::1", "2001:0DB8::1"),
        ("[2001:0DB8::1]:12345", "2001:0DB8::1", "[2001:0DB8::1]:12345"),
        ("[2001:0DB8::1]::12345", "[2001:0DB8::1]::12345", "[2001:0DB8::1]::12345"),
    ],
)
def test_strip_port_and_strip_domain_follow_go_host_port_rules(
    address: str, port_stripped: str, domain_stripped: str
) -> None:
    assert expand(f'{{{{ "{address}" | stripPort }}}}') == port_stripped
    assert expand(f'{{{{ "{address}" | stripDomain }}}}') == domain_stripped


def test_external_url_and_path_prefix_come_from_the_context() -> None:
    out = expand("{{ externalURL }} {{ pathPrefix }}", external_url="http://testhost:9090/path/prefix")
    assert out == "http://testhost:9090/path/prefix /path/prefix"


# --- query results -------------------------------------------------------------------------------


def query_engine(expr: str) -> list[FakeSample]:
    if expr == "up":
        b = FakeSample({"__name__": "up", "instance": "b", "__value__": "x"}, 21)
        return [b, FakeSample({"instance": "a"}, 11)]
    if expr == "bad(":
        raise ValueError("1:4: parse error: unclosed left parenthesis")
    return []


def test_query_results_expose_first_value_label_and_strvalue() -> None:
    text = '{{ $s := query "up" | first }}{{ value $s }} {{ $s | label "instance" }} {{ strvalue $s }}'
    assert expand(text, query=query_engine) == "21 b x"


def test_query_results_sort_by_label_and_range_with_dot_fields() -> None:
    text = '{{ range query "up" | sortByLabel "instance" }}{{ .Labels.instance }}:{{ .Value }} {{ end }}'
    assert expand(text, query=query_engine) == "a:11 b:21 "


def test_empty_query_result_takes_the_else_branch_and_first_fails() -> None:
    assert expand('{{ with query "none" }}x{{ else }}empty{{ end }}', query=query_engine) == "empty"
    err = error_of('{{ query "none" | first }}', query=query_engine)
    assert err.detail.endswith("error calling first: first() called on vector with no elements")


def test_query_without_engine_raises_a_clear_error() -> None:
    err = error_of('{{ query "up" | first | value }}')
    assert "error calling query: no query engine" in str(err)


def test_query_engine_failure_becomes_a_template_error() -> None:
    err = error_of('{{ query "bad(" }}', query=query_engine)
    assert err.detail.endswith("error calling query: 1:4: parse error: unclosed left parenthesis")


# --- control structures, variables and whitespace -----------------------------------------------


def test_else_if_chain_picks_the_first_true_branch() -> None:
    text = '{{ if eq $labels.job "x" }}1{{ else if eq $labels.job "dcgm" }}2{{ else }}3{{ end }}'
    assert expand(text) == "2"


def test_with_rebinds_dot_and_falls_back_to_else_when_empty() -> None:
    assert expand("{{ with $labels.job }}job={{ . }}{{ else }}none{{ end }}") == "job=dcgm"
    assert expand("{{ with $labels.nope }}x{{ else }}none{{ end }}") == "none"


def test_range_else_break_and_continue() -> None:
    assert expand("{{ range $labels }}x{{ else }}empty{{ end }}", labels={}) == "empty"
    text = '{{ range $labels }}{{ if eq . "3" }}{{ continue }}{{ end }}{{ if eq . "dcgm" }}{{ break }}{{ end }}{{ . }};'
    text += "{{ end }}"
    assert expand(text) == "gpu-node-1:9400;"


def test_assignment_reaches_outer_variable_but_declaration_stays_scoped() -> None:
    text = "{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ $y := 3 }}{{ $y }}{{ end }}{{ $x }}"
    assert expand(text) == "32"


def test_and_or_short_circuit_and_return_the_deciding_operand() -> None:
    assert expand('{{ and 1 0 2 }}|{{ or 0 "" "x" }}|{{ not 0 }}|{{ and 0 (index nil 1) }}') == "0|x|true|0"


def test_comparisons_follow_go_kinds() -> None:
    out = expand('{{ eq $labels.job "x" "dcgm" }}|{{ lt "a" "b" }}|{{ ge 2 3 }}|{{ eq 0.5 $value }}')
    assert out == "true|true|false|true"
    err = error_of("{{ gt $value 1 }}")
    assert err.detail == 'executing "template" at <gt $value 1>: error calling gt: incompatible types for comparison'


def test_trim_markers_remove_adjacent_whitespace() -> None:
    assert expand("a  {{- 1 -}}  b {{- /* comment */ -}} c {{/* d */}} d{{ 2 -}}\n   e") == "a1bc  d2e"
    assert expand("{{-3}}") == "-3"  # no space after the dash: a negative number, not a trim marker


def test_comments_render_nothing() -> None:
    assert expand("x{{/* a\nmulti-line comment */}}y") == "xy"


def test_missing_args_key_prints_no_value() -> None:
    assert expand("{{ (args 1).arg0 }}|{{ (args 1).arg5 }}|{{ print (args 1).arg5 }}") == "1|<no value>|<nil>"


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "col", "detail"),
    [
        ("{{", 1, 3, "unclosed action"),
        ("{{ }}", 1, 4, "missing value for command"),
        ("{{ nope }}", 1, 4, 'function "nope" not defined'),
        ("{{ $x }}", 1, 4, 'undefined variable "$x"'),
        ("ok\n  {{ if true }}x", 2, 17, "unexpected EOF"),
        ("{{ end }}", 1, 8, "unexpected {{end}}"),
        ("{{ if true }}a{{ else }}b{{ else }}c{{ end }}", 1, 34, "expected end; found {{else}}"),
        ('{{ "abc }}', 1, 4, "unterminated quoted string"),
        ("{{ 1x }}", 1, 4, 'bad number syntax: "1x"'),
        ("{{ $labels.foo-bar }}", 1, 11, "bad character U+002D '-'"),
        ("{{ 1 | 2 }}", 1, 8, "non executable command in pipeline stage 2"),
        ("{{ print) }}", 1, 9, 'unexpected ")" in command'),
        ("{{/* x */ }}", 1, 1, "comment ends before closing delimiter"),
        ("{{ break }}", 1, 4, "{{break}} outside {{range}}"),
        ('{{ define "x" }}{{ $labels }}{{ end }}', 1, 20, 'undefined variable "$labels"'),
        ("line1\n{{ print\n nope }}", 3, 2, 'function "nope" not defined'),
    ],
)
def test_parse_errors_name_the_position_and_reason(text: str, line: int, col: int, detail: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse(text, "__alert_GpuHot")
    err = info.value
    assert (err.line, err.col, err.detail, err.phase) == (line, col, detail, "parse")
    assert str(err) == f"template: __alert_GpuHot:{line}:{col}: {detail}"


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("{{ humanize 1 2 }}", "wrong number of args for humanize: want 1 got 2"),
        ("{{ printf }}", "wrong number of args for printf: want at least 1 got 0"),
        ("{{ toUpper 1 }}", "expected string; found 1"),
        ("{{ toUpper $value }}", "wrong type for value; expected string; got float64"),
        ('{{ "<b>" | safeHtml | toUpper }}', "wrong type for value; expected string; got template.HTML"),
        ("{{ $value.x }}", "can't evaluate field x in type float64"),
        ("{{ nil }}", "nil is not a command"),
        ("{{ 1 2 }}", "can't give argument to non-function 1"),
        ('{{ template "x" }}', 'template "x" not defined'),
        ("{{ len 3 }}", "error calling len: len of type int"),
        ('{{ reReplaceAll "(" "x" "y" }}', "error calling reReplaceAll: regexp: Compile(`(`): "),
    ],
)
def test_execution_errors_are_template_errors_with_go_messages(text: str, detail: str) -> None:
    err = error_of(text)
    assert err.phase == "exec"
    assert detail in err.detail


def test_integer_value_behaves_as_prometheus_float() -> None:
    assert expand('{{ $value }} {{ gt $value 0.5 }} {{ printf "%T" .Value }}', value=1) == "1 true float64"


def test_parse_is_cached_and_templates_are_reusable() -> None:
    tmpl = parse("{{ $labels.job }}")
    assert parse("{{ $labels.job }}") is tmpl
    assert tmpl.render(TemplateContext(labels={"job": "a"}, value=1)) == "a"
    assert tmpl.render(TemplateContext(labels={"job": "b"}, value=2)) == "b"


def test_deep_nesting_is_refused_not_a_crash() -> None:
    with pytest.raises(TemplateError, match="max expression depth exceeded"):
        parse("{{ " + "(" * 500 + "1" + ")" * 500 + " }}")


def test_recursive_template_stops_at_the_depth_limit() -> None:
    err = error_of('{{ define "r" }}{{ template "r" . }}{{ end }}{{ template "r" . }}')
    assert "exceeded maximum template depth" in err.detail


# --- properties -----------------------------------------------------------------------------------

# Fragments of template syntax, so random strings reach deep into the parser and executor.
_SYNTAX = """{{ }} {{- -}} $labels .job $x := = | ( ) "s" `r` 1 -2.5 if else end range with print printf "%d"
    humanize eq and . nil 'c' /* */ x , break define template block "t" index len $value args 0x1F 1e3 \\"""
TOKENS = st.sampled_from([*_SYNTAX.split(), " ", "\n", "{{ end }}", "{{- ", " -}}"])


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_parses_or_raises_template_error(text: str) -> None:
    with contextlib.suppress(TemplateError):
        parse(text)


@settings(max_examples=300, deadline=None)
@given(st.text().filter(lambda s: "{{" not in s))
def test_text_without_actions_renders_to_itself(text: str) -> None:
    assert expand(text) == text


@settings(max_examples=500, deadline=None)
@given(st.lists(TOKENS, max_size=16).map("".join))
def test_token_soup_parses_and_renders_or_raises_template_error(text: str) -> None:
    try:
        out = expand(text, query=query_engine)
    except TemplateError:
        return
    assert isinstance(out, str)


# --- against a real Prometheus -----------------------------------------------------------------------

DIFFERENTIAL = [
    "{{ $labels.instance }} of job {{ $labels.job }} is down",
    "{{ $value }}|{{ $value | humanize }}|{{ $value | humanizePercentage }}|{{ $value | humanizeDuration }}",
    '{{ printf "%.2f|%v|%5.1e|%d|%s|%q" $value $value $value 1.5 $labels.job $labels.job }}',
    "{{ range $k, $v := $labels }}{{ $k }}={{ $v }};{{ end }}",
    "{{ if gt $value 0.9 }}critical{{ else if gt $value 0.5 }}warning{{ else }}info{{ end }}",
    "a  {{- 1 -}}  b {{- /* c */ -}} c {{/* d */}} d",
    '{{ humanize1024 1048576 }}|{{ humanizeTimestamp 1435065584.128 }}|{{ "a.b:1" | stripDomain }}',
    '{{ reReplaceAll "(\\\\w+):(\\\\d+)" "$2@$1" $labels.instance }}|{{ title "gpu hot" }}',
    "{{ 1e6 }}|{{ 0.1 }}|{{ 123456.0 }}|{{ 1234567.0 }}|{{ -0.0 }}|{{ 1e-5 }}",
    '{{ printf "%d" 1.5 }}|{{ printf "%x" "hi" }}|{{ printf "%v" $labels }}',
]


def promtool_render(promtool: str, tmp_path: Path, templates: list[str], value: str) -> list[str]:
    """Render templates as annotations of one firing alert, reading them from promtool's report."""
    rules = {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "m", "annotations": {}}]}]}
    rules["groups"][0]["rules"][0]["annotations"] = {f"a{i}": t for i, t in enumerate(templates)}  # type: ignore[index]
    series = "m{" + ",".join(f'{k}="{v}"' for k, v in LABELS.items()) + "}"
    test = {
        "rule_files": ["rules.json"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": value}],
                "alert_rule_test": [{"eval_time": "0m", "alertname": "A", "exp_alerts": []}],
            }
        ],
    }
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    (tmp_path / "test.json").write_text(json.dumps(test))
    command = [promtool, "test", "rules", "test.json"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # The expected-nothing test fails and prints what fired, annotations as Go-quoted strings.
    match = re.search(r"Annotations:\{(.*)\}\n", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    found = {int(m[1]): json.loads(m[2]) for m in re.finditer(r'a(\d+)=("(?:[^"\\]|\\.)*")', match[1])}
    return [found.get(i, "") for i in range(len(templates))]


@pytest.mark.integration
@pytest.mark.parametrize("value", ["0.5", "0.97", "1234567", "NaN"])
def test_rendering_matches_promtool(tmp_path: Path, value: str) -> None:
    promtool = require_tool("promtool", "prometheus")
    expected = promtool_render(promtool, tmp_path, DIFFERENTIAL, value)
    labels = {"__name__": "m", **LABELS}
    ours = [expand(t, value=float(value), labels=labels) for t in DIFFERENTIAL]
    assert ours == expected
