"""Generates the rules reference (docs/rules.md) from the default rule files.

`python -m sentinel.rules.doc rules/*.yml > docs/rules.md`; a test regenerates it and
fails when the committed file differs, so the reference always matches the rules.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sentinel.rules.rulefile import Rule, load_rule_files

__all__ = ["render"]

HEADER = """# Rules reference

Generated from `rules/*.yml` by `python -m sentinel.rules.doc`; a test checks that this
file matches them. The rules are plain Prometheus rule files: they pass
`promtool check rules`, have unit tests in `rules/tests/` that pass under both
`promtool test rules` and `sentinel test rules`, and run unchanged in a fleet
Prometheus. `action` is the remediation the rule suggests; the `remediation.routes`
of `sentinel.yaml` can override it, and `remediation.mode: observe` only reports it.
What each alert means and what to do: [runbooks](runbooks.md).
"""


def _duration(ms: int) -> str:
    if ms == 0:
        return "0s"
    parts = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    if ms:
        parts.append(f"{ms}ms")
    return "".join(parts)


def _row(rule: Rule) -> str:
    summary = rule.annotations.get("summary", "").replace("|", "\\|").replace("\n", " ")
    expr = " ".join(rule.expr.split()).replace("|", "\\|")
    return (
        f"| `{rule.name}` | {rule.labels.get('severity', '')} | {rule.labels.get('action', 'none')} | "
        f"{_duration(rule.for_ms)} | `{expr}` | {summary} |"
    )


def render(files: Sequence[str]) -> str:
    """The reference for `files` (globs allowed) as Markdown."""
    out = [HEADER]
    for group in load_rule_files(files):
        out.append(f"\n## `{group.name}` ({group.file}, every {_duration(group.interval_ms or 1000)})\n")
        out.append("| alert | severity | action | for | expression | summary |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        out.extend(_row(rule) for rule in group.rules if rule.is_alert)
        records = [rule for rule in group.rules if not rule.is_alert]
        if records:
            out.append("\nRecording rules: " + ", ".join(f"`{r.name}`" for r in records) + ".")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1:] or ["rules/*.yml"]))
