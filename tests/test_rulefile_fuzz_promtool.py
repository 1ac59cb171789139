"""Generated rule files, YAML's odd corners included, through `check rules` and promtool 2.42.

Hypothesis writes rule files as text: anchors on rules and scalars, merge keys (one
mapping or a list, written keys before or after), aliases as expressions, standard and
unknown tags, plain/quoted/block scalars that YAML 1.1 and 1.2 read differently, deep
nesting where a string belongs, duplicate keys, unknown fields. Sentinel must never end
in a traceback and must give promtool's verdict and exit code on every one.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require_tool
from tests.rule_suites import run_promtool, run_sentinel

pytestmark = pytest.mark.integration

ODD_SCALARS = [
    "yes", "no", "on", "off", "~", "null", "Null", "''", '""', "0", "0x1F", "0o17", "017", "1e3", "1_000",
    ".inf", "-.Inf", ".NaN", "2001-12-14", "12:30:45", "true", "'single'", '"dou\\"ble"', "'it''s'",
    '"\\u00e9t\\u00e9"', "été", "a#b", "'#x'", "-", "'- x'", '"{{ $value }}"', "'{{ bad'", "'{{ nosuch }}'",
]  # fmt: skip
EXPRESSIONS = [
    "up", "up == 0", "'sum by (job) (rate(x[5m])) > 1'", '"up ==="', "'rate(x)'", "'sum(x'", "'x offset -1m'",
    "'1 +'", "'nosuch(x)'", "'histogram_quantile(0.9, rate(x_bucket[5m]))'", '"x{a=\\"b\\"}"', "'x @ 100'",
]  # fmt: skip
DURATIONS = ["5m", "0", "0s", "1h30m", "90", "5x", "''", "1.5m", "-1m", "!!str 10s", "[1m]", "{a: 1}"]
NAMES = ["A", "a:b", "a b", "5", "'x{y}'", "''", "__name__", "bad-name", "ok_name", "yes"]
LABEL_VALUES = ["x", "page", '"{{ $labels.job }}"'] * 4 + ODD_SCALARS
TAGS = ["", "", "", "!!str ", "!Custom ", "!!binary "]


@dataclass
class _Text:
    """A document being written, with the anchors defined so far."""

    lines: list[str] = field(default_factory=list)
    scalar_anchors: list[str] = field(default_factory=list)
    rule_anchors: list[str] = field(default_factory=list)
    counter: int = 0

    def anchor(self) -> str:
        self.counter += 1
        return f"a{self.counter}"


def _nested(depth: int) -> str:
    return "[" * depth + "x" + "]" * depth if depth % 2 else "{k: " * depth + "v" + "}" * depth


@st.composite
def _value(draw: st.DrawFn, text: _Text, choices: list[str]) -> str:
    kind = draw(
        st.sampled_from(["plain"] * 10 + ["odd", "odd", "alias", "alias", "anchor", "anchor", "block", "nested"])
    )
    if kind == "alias" and text.scalar_anchors:
        return "*" + draw(st.sampled_from(text.scalar_anchors))
    if kind == "odd":
        return draw(st.sampled_from(TAGS)) + draw(st.sampled_from(ODD_SCALARS))
    if kind == "nested":
        return _nested(draw(st.integers(1, 40)))
    value = draw(st.sampled_from(choices))
    if kind == "anchor":
        name = text.anchor()
        text.scalar_anchors.append(name)
        return f"&{name} {value}"
    if kind == "block" and not value.startswith(("[", "{", "!", "*")):
        style = draw(st.sampled_from(["|", ">-", "|-"]))
        return f"{style}\n        {value.strip(chr(39) + chr(34))}"
    return value


@st.composite
def _rule(draw: st.DrawFn, text: _Text) -> list[str]:
    keys: list[tuple[str, str]] = []
    kind = draw(st.sampled_from(["alert"] * 4 + ["record"] * 4 + ["both", "neither"]))
    if kind in ("alert", "both"):
        keys.append(("alert", draw(_value(text, NAMES))))
    if kind in ("record", "both"):
        keys.append(("record", draw(_value(text, ["a:b", "x", "job:up:sum", "a b", "'x{y}'"]))))
    if draw(st.integers(0, 9)):
        keys.append(("expr", draw(_value(text, EXPRESSIONS[:4] * 3 + EXPRESSIONS))))
    if draw(st.booleans()):
        keys.append(("for", draw(st.sampled_from(DURATIONS[:4] * 4 + DURATIONS))))
    if draw(st.integers(0, 6)) == 0:
        keys.append(("keep_firing_for", draw(st.sampled_from(DURATIONS[:4] * 4 + DURATIONS))))
    for section in ("labels", "annotations"):
        if draw(st.booleans()):
            names = draw(st.lists(st.sampled_from(["severity", "team", "summary"] * 3 + NAMES), max_size=3))
            inner = ", ".join(f"{n}: {draw(_value(text, LABEL_VALUES))}" for n in names)
            keys.append((section, "{" + inner.replace("\n", " ") + "}" if "\n" not in inner else "{}"))
    if draw(st.integers(0, 12)) == 0:
        keys.append((draw(st.sampled_from(["severity", "exprs", "alert", "Expr"])), "x"))
    merge = None
    if text.rule_anchors and draw(st.integers(0, 2)) == 0:
        refs = draw(st.lists(st.sampled_from(text.rule_anchors), min_size=1, max_size=2))
        merge = "*" + refs[0] if len(refs) == 1 else "[" + ", ".join("*" + r for r in refs) + "]"
    lines: list[str] = []
    anchor = ""
    if draw(st.integers(0, 2)) == 0:
        name = text.anchor()
        text.rule_anchors.append(name)
        anchor = f"&{name} "
    entries = [f"{k}: {v}" for k, v in keys]
    if merge is not None:
        entries.insert(draw(st.integers(0, len(entries))), f"<<: {merge}")
    if not entries:
        return [f"  - {anchor}{{}}"]
    # An anchor written before the first key on its line would name that key: give it a line.
    if anchor:
        lines.append(f"  - {anchor.strip()}")
        lines.extend("    " + e.replace("\n", "\n    ") for e in entries)
        return lines
    lines.append("  - " + entries[0].replace("\n", "\n    "))
    lines.extend("    " + e.replace("\n", "\n    ") for e in entries[1:])
    return lines


@st.composite
def rule_files(draw: st.DrawFn) -> str:
    text = _Text()
    out = ["groups:"]
    for _ in range(draw(st.integers(1, 3))):
        out.append(f"- name: {draw(_value(text, ['g', 'h', 'i', 'j', '5', 'yes', repr('')]))}")
        if draw(st.integers(0, 3)) == 0:
            out.append(f"  interval: {draw(st.sampled_from(DURATIONS[:4] * 4 + DURATIONS))}")
        if draw(st.integers(0, 5)) == 0:
            out.append(f"  {draw(st.sampled_from(['limit: 5', 'limit: x', 'query_offset: 1m', 'labels: {a: b}']))}")
        out.append("  rules:")
        for _ in range(draw(st.integers(0, 4))):
            out.extend("  " + line for line in draw(_rule(text)))
    return "\n".join(out) + "\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rule_files())
def test_generated_rule_files_get_promtools_verdict_and_no_traceback(document: str) -> None:
    promtool = require_tool("promtool", "prometheus")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "rules.yml").write_text(document, encoding="utf-8")
        theirs = run_promtool(promtool, ["check", "rules", "rules.yml"], Path(tmp), timeout=60)
        ours = run_sentinel(["check", "rules", "--prometheus-compat", "2", "rules.yml"], Path(tmp))
    assert "Traceback" not in ours.stderr, ours.stderr
    assert (ours.rc, ours.verdict()) == (theirs.rc, theirs.verdict()), (
        f"{document}\n-- promtool\n{theirs.stdout}{theirs.stderr}-- sentinel\n{ours.stdout}{ours.stderr}"
    )
