"""docs/configuration.md is generated from the config models and must match them."""

from __future__ import annotations

from pathlib import Path

from sentinel.config.doc import render

REPO = Path(__file__).resolve().parents[1]


def test_configuration_reference_matches_the_models() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == render(), "run: python -m sentinel.config.doc > docs/configuration.md"


def test_reference_covers_every_section() -> None:
    text = render()
    for section in ("`collectors.nvml`", "`workers[]`", "`rules`", "`remediation`", "`notify`", "`control`"):
        assert f"## {section}" in text


def test_rules_reference_matches_the_default_rules() -> None:
    import os

    from sentinel.rules.doc import render as render_rules

    cwd = os.getcwd()
    os.chdir(REPO)  # the reference names files relative to the repository
    try:
        expected = render_rules(["rules/*.yml"])
    finally:
        os.chdir(cwd)
    assert (REPO / "docs" / "rules.md").read_text() == expected, "run: python -m sentinel.rules.doc > docs/rules.md"
