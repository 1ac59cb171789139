"""Shared fixtures and the rule for integration tests: run under CI, else skip with a how-to."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.etcd_cluster import EtcdCluster, running_cluster

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


def require_module(name: str, hint: str = "") -> ModuleType:
    """Import a Python package a test needs (torch, transformers); skip without it, fail under CI."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        message = f"{name} is not installed ({exc}); {hint or 'pip install -e .[sim]'} to run this test"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


@pytest.fixture
def sleeper() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real child process with a unique token in its command line, killed afterwards."""
    token = f"sentinel-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", token])
    try:
        yield proc, token
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def etcd1() -> Iterator[EtcdCluster]:
    """One real etcd member shared by a test module; tests isolate themselves by fleet name."""
    require_tool("etcd", "etcd-server")
    with running_cluster(1) as cluster:
        yield cluster


@pytest.fixture
def etcd3() -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster, for tests that kill members."""
    require_tool("etcd", "etcd-server")
    with running_cluster(3) as cluster:
        yield cluster


@pytest.fixture
def fleet_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"
