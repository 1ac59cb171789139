"""Sentinel against Debian's promtool 2.42 on public rule suites written by other teams.

Every rule file under tests/data/rule-suites/ goes through `check rules`, every test
file through `test rules --prometheus-compat 2`, in both tools (see tests/rule_suites.py).
They must give the same exit code and verdict; `test rules` must print the same bytes
on both streams, and so must `check rules` up to the order of the lines within its
error report (promtool walks Go maps, whose order is random, for label errors).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.rule_suites import SUITES, compare, discover

pytestmark = pytest.mark.integration

RULE_FILES, TEST_FILES = discover(SUITES)
COMPAT = ["--prometheus-compat", "2"]


def _id(path: Path) -> str:
    return str(path.relative_to(SUITES))


def test_the_corpus_is_large_and_has_its_sources() -> None:
    assert len(RULE_FILES) >= 400 and len(TEST_FILES) >= 200
    for suite in SUITES.iterdir():
        assert (suite / "SOURCE").read_text().startswith("repository: https://github.com/"), suite
        assert (suite / "LICENSE").stat().st_size > 100, suite


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=_id)
def test_check_rules_agrees_with_promtool(rule_file: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    result = compare("check", rule_file, promtool, COMPAT)
    assert result.sentinel.rc == result.promtool.rc, result.describe()
    assert result.sentinel.stdout == result.promtool.stdout, result.describe()
    assert sorted(result.sentinel.stderr.splitlines()) == sorted(result.promtool.stderr.splitlines()), result.describe()


# Both tools evaluate each file in full: Wikimedia's global_test.yaml takes minutes of
# promtool and Sentinel together on a loaded 2-core machine, past the default 120 s.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("test_file", TEST_FILES, ids=_id)
def test_test_rules_prints_what_promtool_prints(test_file: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    result = compare("test", test_file, promtool, COMPAT)
    assert result.sentinel.rc == result.promtool.rc, result.describe()
    assert result.sentinel.stdout == result.promtool.stdout, result.describe()
    assert same_duplicates(result.sentinel.stderr) == same_duplicates(result.promtool.stderr), result.describe()


# promtool 2.42 names the two series of a many-to-many error in the order its test storage
# holds them, which follows the order the input series were added, and that varies from run
# to run (both orders seen with the same file). The pair is compared as a set.
_DUPLICATE_PAIR = re.compile(r"(on the \w+ hand-side of the operation: )\[(\{.*?\}), (\{.*?\})\];")


def same_duplicates(text: str) -> str:
    return _DUPLICATE_PAIR.sub(lambda m: f"{m[1]}[{', '.join(sorted((m[2], m[3])))}];", text)


def test_the_sentinel_command_checks_a_whole_suite_like_promtool() -> None:
    """One real `sentinel` process over many files: per-file sections and the exit code."""
    promtool = require_tool("promtool", "prometheus")
    suite = SUITES / "monitoring-mixins"
    files = sorted(str(p.relative_to(suite)) for p in suite.rglob("*.yaml"))
    ours = subprocess.run(
        [sys.executable, "-m", "sentinel", "check", "rules", *COMPAT, *files],
        cwd=suite,
        capture_output=True,
        text=True,
        timeout=600,
    )
    theirs = subprocess.run(
        [promtool, "check", "rules", *files], cwd=suite, capture_output=True, text=True, timeout=600
    )
    assert ours.returncode == theirs.returncode
    assert ours.stdout == theirs.stdout
    assert sorted(ours.stderr.splitlines()) == sorted(theirs.stderr.splitlines())
