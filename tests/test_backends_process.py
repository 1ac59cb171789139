"""The process backend against real child processes: profiles, logs, stop escalation, exits."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sentinel.remediation.backend import ActionContext, BackendError, ProfileRecord, UnitState, WorkerBackend
from sentinel.remediation.backends import ProcessBackend, worker_files
from sentinel.remediation.backends.envfile import read_env_file
from sentinel.remediation.settings import Profile
from tests.support import eventually_async as eventually

# The worker stand-in: records its argv and environment (one JSON line per start),
# talks on stdout and stderr, optionally ignores SIGTERM, spawns a grandchild or exits.
CHILD = r"""
import json, os, signal, subprocess, sys, time
out = sys.argv[1]
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
record = {"pid": os.getpid(), "pgid": os.getpgid(0), "argv": sys.argv, "env": dict(os.environ)}
if os.environ.get("GRANDCHILD"):
    record["grandchild"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid
with open(out, "a") as f:
    f.write(json.dumps(record) + "\n")
print(f"stdout line from {os.environ['SENTINEL_PROFILE']}", flush=True)
print("stderr line", file=sys.stderr, flush=True)
if "EXIT_CODE" in os.environ:
    sys.exit(int(os.environ["EXIT_CODE"]))
time.sleep(60)
"""

CTX = ActionContext(worker="qwen", action="restart", alertname="WorkerOOM")
FULL = Profile(name="full", env={"MAX_NUM_SEQS": "64"})
REDUCED = Profile(name="reduced", env={"MAX_NUM_SEQS": "16", "EXTRA": "$(not expanded)"})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Worker:
    """A child script plus the file it reports to."""

    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / "child.py"
        self.script.write_text(CHILD)
        self.records = tmp_path / "records.jsonl"
        self.state_dir = tmp_path / "state"

    def backend(self, **kwargs: Any) -> ProcessBackend:
        kwargs.setdefault("state_dir", self.state_dir)
        return ProcessBackend("qwen", [sys.executable, str(self.script), str(self.records)], **kwargs)

    def starts(self) -> list[dict[str, Any]]:
        if not self.records.exists():
            return []
        return [json.loads(line) for line in self.records.read_text().splitlines()]

    async def started(self, count: int) -> dict[str, Any]:
        await eventually(lambda: len(self.starts()) >= count)
        return self.starts()[count - 1]


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    return Worker(tmp_path)


@pytest.fixture
async def cleanup() -> AsyncIterator[list[ProcessBackend]]:
    backends: list[ProcessBackend] = []
    yield backends
    for backend in backends:
        backend.stop_on_exit = True
        backend.stop_timeout = 0.2
        await backend.close()


def test_process_backend_is_a_worker_backend_that_records_its_profile(worker: Worker) -> None:
    backend = worker.backend()
    assert isinstance(backend, WorkerBackend)
    assert isinstance(backend, ProfileRecord)


async def test_restart_replaces_the_child_and_applies_the_new_profile_env(
    worker: Worker, cleanup: list[ProcessBackend]
) -> None:
    backend = worker.backend(env={"HF_HOME": "/models"})
    cleanup.append(backend)
    await backend.start(FULL, CTX)
    first = await worker.started(1)
    assert first["env"]["MAX_NUM_SEQS"] == "64"
    assert first["env"]["SENTINEL_PROFILE"] == "full"
    assert first["env"]["SENTINEL_WORKER"] == "qwen"
    assert first["env"]["HF_HOME"] == "/models"
    assert first["env"]["PATH"] == os.environ["PATH"]  # os.environ is the base layer
    assert first["pgid"] == first["pid"]  # its own process group

    await backend.restart(REDUCED, CTX)
    second = await worker.started(2)
    assert second["pid"] != first["pid"]
    assert not alive(first["pid"])
    assert second["env"]["MAX_NUM_SEQS"] == "16"
    assert second["env"]["EXTRA"] == "$(not expanded)"
    assert second["env"]["SENTINEL_PROFILE"] == "reduced"
    assert await backend.state() == UnitState("active", f"pid {second['pid']}, profile reduced")
    assert await backend.active_profile() == "reduced"
    _log, env_file, _pid = worker_files(worker.state_dir, "qwen")
    assert read_env_file(env_file) == {"MAX_NUM_SEQS": "16", "EXTRA": "$(not expanded)", "SENTINEL_PROFILE": "reduced"}


async def test_output_of_every_run_is_appended_to_the_log_file(worker: Worker, cleanup: list[ProcessBackend]) -> None:
    backend = worker.backend()
    cleanup.append(backend)
    await backend.start(FULL, CTX)
    await worker.started(1)
    await backend.restart(REDUCED, CTX)
    await worker.started(2)
    log_file, _env, _pid = worker_files(worker.state_dir, "qwen")

    def lines() -> list[str]:
        return log_file.read_text().splitlines()

    await eventually(lambda: len(lines()) >= 4)
    assert sorted(lines()) == ["stderr line", "stderr line", "stdout line from full", "stdout line from reduced"]


async def test_custom_log_file_is_used(worker: Worker, tmp_path: Path, cleanup: list[ProcessBackend]) -> None:
    backend = worker.backend(log_file=tmp_path / "logs" / "qwen.out")
    cleanup.append(backend)
    await backend.start(FULL, CTX)
    await eventually(lambda: "stdout line from full" in (tmp_path / "logs" / "qwen.out").read_text())


@pytest.mark.wallclock
async def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(worker: Worker, cleanup: list[ProcessBackend]) -> None:
    backend = worker.backend(env={"IGNORE_TERM": "1"}, stop_timeout=0.5)
    cleanup.append(backend)
    await backend.start(FULL, CTX)
    child = await worker.started(1)
    started = time.monotonic()
    await backend.stop(CTX)
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 8.0
    assert not alive(child["pid"])
    assert backend.last_exit == -9
    assert await backend.state() == UnitState("inactive", "stopped with SIGKILL after stop_timeout")


@pytest.mark.wallclock
async def test_stop_with_a_cooperative_child_needs_no_sigkill(worker: Worker, cleanup: list[ProcessBackend]) -> None:
    backend = worker.backend(stop_timeout=30.0)
    cleanup.append(backend)
    await backend.start(FULL, CTX)
    await worker.started(1)
    started = time.monotonic()
    await backend.stop(CTX)
    assert time.monotonic() - started < 10.0  # well before stop_timeout: SIGTERM did it
    assert backend.last_exit == -15
    assert await backend.state() == UnitState("inactive", "stopped")
    _log, _env, pid_file = worker_files(worker.state_dir, "qwen")
    assert not pid_file.exists()


async def test_stop_reaches_the_whole_process_group(worker: Worker, cleanup: list[ProcessBackend]) -> None:
    backend = worker.backend(env={"GRANDCHILD": "1"}, stop_timeout=5.0)
    cleanup.append(backend)
    await backend.start(FULL, CTX)
    child = await worker.started(1)
    assert alive(child["grandchild"])
    await backend.stop(CTX)
    await eventually(lambda: not alive(child["grandchild"]))


async def test_crash_is_reported_with_its_exit_code_and_not_restarted(
    worker: Worker, cleanup: list[ProcessBackend]
) -> None:
    backend = worker.backend(env={"EXIT_CODE": "3"})
    cleanup.append(backend)
    await backend.start(FULL, CTX)
    await worker.started(1)
    await eventually(lambda: backend.last_exit is not None)
    assert await backend.state() == UnitState("failed", "exited with status 3")
    await asyncio.sleep(0.5)  # a supervisor that restarts by itself would have done so by now
    assert len(worker.starts()) == 1
    await backend.start(FULL, CTX)  # the policy decides to start it again
    await worker.started(2)


async def test_clean_exit_is_inactive_and_never_started_is_inactive(
    worker: Worker, cleanup: list[ProcessBackend]
) -> None:
    backend = worker.backend(env={"EXIT_CODE": "0"})
    cleanup.append(backend)
    assert await backend.state() == UnitState("inactive", "not started")
    await backend.start(FULL, CTX)
    await eventually(lambda: backend.last_exit is not None)
    assert await backend.state() == UnitState("inactive", "exited with status 0")


async def test_start_while_running_keeps_the_running_child(worker: Worker, cleanup: list[ProcessBackend]) -> None:
    backend = worker.backend()
    cleanup.append(backend)
    await backend.start(FULL, CTX)
    first = await worker.started(1)
    await backend.start(REDUCED, CTX)
    assert backend.pid == first["pid"]
    assert await backend.active_profile() == "full"


async def test_missing_program_is_a_backend_error(tmp_path: Path) -> None:
    backend = ProcessBackend("qwen", [str(tmp_path / "no-such-program")], state_dir=tmp_path)
    with pytest.raises(BackendError, match="cannot run"):
        await backend.start(FULL, CTX)


async def test_close_stops_the_child_by_default(worker: Worker) -> None:
    backend = worker.backend(stop_timeout=5.0)
    await backend.start(FULL, CTX)
    child = await worker.started(1)
    await backend.close()
    assert not alive(child["pid"])


async def test_child_left_running_is_adopted_by_the_next_sentinel(worker: Worker) -> None:
    first = worker.backend(stop_on_exit=False, stop_timeout=5.0)
    await first.start(FULL, CTX)
    child = await worker.started(1)
    await first.close()
    assert alive(child["pid"])

    second = worker.backend(stop_timeout=5.0)  # a restarted Sentinel
    try:
        assert await second.state() == UnitState("active", f"pid {child['pid']}, adopted from an earlier Sentinel")
        assert await second.active_profile() == "full"
        await second.start(FULL, CTX)
        assert len(worker.starts()) == 1  # no second copy
        await second.stop(CTX)
        await eventually(lambda: not alive(child["pid"]))
        assert await second.state() == UnitState("inactive", "not started")
    finally:
        await second.close()
        if alive(child["pid"]):
            os.killpg(child["pid"], 9)


async def test_a_stale_pid_file_is_not_adopted(worker: Worker, cleanup: list[ProcessBackend]) -> None:
    _log, _env, pid_file = worker_files(worker.state_dir, "qwen")
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{os.getpid()} 1\n")  # a live pid, but another process's start time
    backend = worker.backend()
    cleanup.append(backend)
    assert await backend.state() == UnitState("inactive", "not started")
    await backend.start(FULL, CTX)
    await worker.started(1)


async def test_sentinels_own_service_variables_do_not_leak_to_the_worker(
    worker: Worker, cleanup: list[ProcessBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    backend = worker.backend()
    cleanup.append(backend)
    await backend.start(FULL, CTX)
    env = (await worker.started(1))["env"]
    assert "NOTIFY_SOCKET" not in env
    assert "WATCHDOG_USEC" not in env


def test_build_backend_wires_a_process_worker_with_default_files(tmp_path: Path) -> None:
    from sentinel.config.models import WorkerConfig
    from sentinel.remediation.backends import build_backend

    worker = WorkerConfig.model_validate(
        {
            "name": "qwen",
            "backend": {"type": "process", "argv": ["vllm", "serve"], "env": {"A": "1"}, "stop_timeout": "3s"},
            "profiles": [{"name": "full"}],
        }
    )
    backend = build_backend(worker, tmp_path, stop_on_exit=False)
    assert isinstance(backend, ProcessBackend)
    assert (backend.argv, backend.env, backend.stop_timeout, backend.stop_on_exit) == (
        ("vllm", "serve"),
        {"A": "1"},
        3.0,
        False,
    )
    assert backend.log_file == tmp_path / "workers" / "qwen.log"
    assert build_backend(WorkerConfig(name="observed"), tmp_path) is None  # no backend: observe only
