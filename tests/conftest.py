"""Shared fixtures and the rule for integration tests: run under CI, else skip with a how-to."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(tool: str, package: str) -> str:
    """Path of a real external tool; fails under CI when absent, skips elsewhere."""
    path = shutil.which(tool)
    if path is None:
        message = (
            f"{tool} not found: install the Debian package {package!r} (apt-get install {package}) to run this test"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path
