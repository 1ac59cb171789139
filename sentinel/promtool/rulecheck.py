"""`sentinel check rules FILE...`: promtool's `check rules`, report and exit codes alike.

For each file: `Checking FILE` on stdout, then `  SUCCESS: N rules found` on stdout or
`  FAILED:` and one line per problem on stderr, then a blank line. The duplicate-rule
lint (`--lint=duplicate-rules`, the default, or `all`) reports rules of one file with
the same name and labels as a failure that does not change the exit code unless
`--lint-fatal` is given (then 3). Exit 1 when any file has a real error; a file that
is missing or a directory stops everything first, as kingpin does for promtool.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

from sentinel.rules.rulefile import (
    DEFAULT_PROMETHEUS_COMPAT,
    RuleFileError,
    duplicate_rules,
    duplicate_rules_message,
    load_rule_files,
)

__all__ = ["LINT_OPTIONS", "check_rules"]

LINT_OPTIONS = ("all", "duplicate-rules", "none")
EXIT_SUCCESS, EXIT_FAILURE, EXIT_LINT = 0, 1, 3


def check_rules(
    files: Sequence[str],
    prometheus_compat: int = DEFAULT_PROMETHEUS_COMPAT,
    lint: str = "duplicate-rules",
    lint_fatal: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Check every file, print promtool's report; 0 valid, 1 invalid, 3 lint-only with lint_fatal."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    for file in files:
        if not os.path.exists(file):
            print(f"sentinel: error: path '{file}' does not exist, try --help", file=err)
            return EXIT_FAILURE
        if os.path.isdir(file):
            print(f"sentinel: error: '{file}' is a directory, try --help", file=err)
            return EXIT_FAILURE
    lint_duplicates = False
    for setting in lint.split(","):
        if setting in ("all", "duplicate-rules"):
            lint_duplicates = True
        elif setting != "none":
            print(f"WARNING: unknown lint option {setting}", file=out)
    failed = has_errors = False
    for file in files:
        print(f"Checking {file}", file=out)
        out.flush()
        errors: list[str] = []
        lint_only = False
        try:
            groups = load_rule_files([file], prometheus_compat)
        except RuleFileError as exc:
            errors = [str(p) for p in exc.problems for _ in range(p.times)]
        else:
            duplicates = duplicate_rules(groups) if lint_duplicates else []
            if duplicates:
                errors, lint_only = [duplicate_rules_message(duplicates)], True
        if errors:
            failed = True
            has_errors = has_errors or not lint_only
            print("  FAILED:", file=err)
            for message in errors:
                print(message, file=err)
            err.flush()
        else:
            print(f"  SUCCESS: {sum(len(g.rules) for g in groups)} rules found", file=out)
        print(file=out)
    if failed and has_errors:
        return EXIT_FAILURE
    if failed and lint_fatal:
        return EXIT_LINT
    return EXIT_SUCCESS
