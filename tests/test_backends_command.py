"""The command backend: hostile label values reach the command only as data; timeouts kill."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sentinel.remediation.backend import ActionContext, BackendError, ProfileRecord, UnitState, WorkerBackend
from sentinel.remediation.backends import CommandBackend
from sentinel.remediation.settings import Profile

# Dumps its argv and environment, as JSON, to the file named by its first argument.
DUMP = r"""
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}) + "\n")
print("dumped")
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""

# Spawns a grandchild, records both pids, then hangs.
HANG = r"""
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
print("about to hang", flush=True)
time.sleep(60)
"""

FULL = Profile(name="full", env={"MAX_NUM_SEQS": "64"})
FP8 = Profile(name="fp8", env={"MAX_NUM_SEQS": "16", "QUANTIZATION": "fp8"}, quantized=True)


class Commands:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.dump = tmp_path / "dump.py"
        self.dump.write_text(DUMP)
        self.hang = tmp_path / "hang.py"
        self.hang.write_text(HANG)
        self.out = tmp_path / "calls.jsonl"

    def argv(self, verb: str, *extra: str) -> list[str]:
        return [sys.executable, str(self.dump), str(self.out), verb, *extra]

    def calls(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]


@pytest.fixture
def cmds(tmp_path: Path) -> Commands:
    return Commands(tmp_path)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_command_backend_is_a_worker_backend_that_records_its_profile(cmds: Commands, tmp_path: Path) -> None:
    backend = CommandBackend("qwen", state_dir=tmp_path, restart=cmds.argv("restart"))
    assert isinstance(backend, WorkerBackend)
    assert isinstance(backend, ProfileRecord)


async def test_shell_metacharacters_in_labels_arrive_as_inert_environment_values(
    cmds: Commands, tmp_path: Path
) -> None:
    canary = tmp_path / "pwned"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("still here")
    hostile = {
        "subst": f"$(touch {canary})",
        "semicolon": f"; rm -rf {victim}; touch {canary}",
        "backticks": f"`touch {canary}`",
        "quotes": "'\"'; touch " + str(canary) + " #",
        "newlines": f"line one\ntouch {canary}\nline three",
        "pipes": f"| touch {canary} && touch {canary} || touch {canary} > {canary}",
        "vars": "$HOME ${PATH} $$ $0 * ?",
        "unicode": "Grüße ✓ \t tab",
    }
    ctx = ActionContext(
        worker="qwen",
        action="restart",
        alertname=f"WorkerOOM$(touch {canary})",
        fingerprint="`id`",
        profile="full",
        previous_profile="; reboot",
        labels=hostile,
    )
    # Operator-given argv elements with metacharacters stay literal too: no shell, no templating.
    argv = cmds.argv("restart", "$HOME", "*", "{worker}", f"$(touch {canary})")
    backend = CommandBackend("qwen", state_dir=tmp_path / "state", restart=argv)

    await backend.restart(FULL, ctx)

    [call] = cmds.calls()
    assert call["argv"] == argv[2:]
    env = call["env"]
    for name, value in hostile.items():
        assert env[f"SENTINEL_LABEL_{name.upper()}"] == value
    assert env["SENTINEL_ALERTNAME"] == f"WorkerOOM$(touch {canary})"
    assert env["SENTINEL_FINGERPRINT"] == "`id`"
    assert env["SENTINEL_PREVIOUS_PROFILE"] == "; reboot"
    assert env["SENTINEL_WORKER"] == "qwen"
    assert env["SENTINEL_ACTION"] == "restart"
    assert env["SENTINEL_PROFILE"] == "full"
    assert env["SENTINEL_VERB"] == "restart"
    assert env["MAX_NUM_SEQS"] == "64"
    assert env["PATH"] == os.environ["PATH"]
    assert not canary.exists()
    assert (victim / "keep").read_text() == "still here"


async def test_profile_change_runs_apply_profile_and_same_profile_runs_restart(cmds: Commands, tmp_path: Path) -> None:
    backend = CommandBackend(
        "qwen",
        state_dir=tmp_path / "state",
        restart=cmds.argv("restart"),
        apply_profile=cmds.argv("apply_profile"),
    )
    ctx = ActionContext(worker="qwen", action="restart")
    await backend.restart(FULL, ctx)  # nothing recorded yet: apply, to be sure the worker gets it
    await backend.restart(FULL, ctx)
    await backend.restart(FP8, ActionContext(worker="qwen", action="quantized_fallback", previous_profile="full"))
    verbs = [(c["argv"][1], c["env"]["SENTINEL_PROFILE"]) for c in cmds.calls()]
    assert verbs == [("apply_profile", "full"), ("restart", "full"), ("apply_profile", "fp8")]
    assert cmds.calls()[-1]["env"]["QUANTIZATION"] == "fp8"
    assert await backend.active_profile() == "fp8"
    # The record survives a restart of Sentinel.
    again = CommandBackend("qwen", state_dir=tmp_path / "state", restart=cmds.argv("restart"))
    assert await again.active_profile() == "fp8"


async def test_without_restart_command_stop_then_start_restarts(cmds: Commands, tmp_path: Path) -> None:
    backend = CommandBackend("qwen", state_dir=tmp_path, start=cmds.argv("start"), stop=cmds.argv("stop"))
    await backend.restart(FULL, ActionContext(worker="qwen", action="restart"))
    assert [c["argv"][1] for c in cmds.calls()] == ["stop", "start"]


async def test_unconfigured_verb_is_a_backend_error(cmds: Commands, tmp_path: Path) -> None:
    backend = CommandBackend("qwen", state_dir=tmp_path, restart=cmds.argv("restart"))
    with pytest.raises(BackendError, match="no stop command configured"):
        await backend.stop(ActionContext(worker="qwen", action="stop"))
    with pytest.raises(BackendError, match="no start command configured"):
        await backend.start(FULL, ActionContext(worker="qwen", action="restart"))


async def test_nonzero_exit_is_a_backend_error_quoting_the_output(cmds: Commands, tmp_path: Path) -> None:
    failing = Profile(name="x", env={"EXIT_CODE": "4"})
    backend = CommandBackend("qwen", state_dir=tmp_path, restart=cmds.argv("restart"))
    with pytest.raises(BackendError, match="restart command exited with status 4; output: dumped"):
        await backend.restart(failing, ActionContext(worker="qwen", action="restart"))
    assert await backend.active_profile() is None  # a failed verb records nothing


@pytest.mark.wallclock
async def test_timeout_kills_the_command_and_what_it_spawned(cmds: Commands, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    backend = CommandBackend("qwen", state_dir=tmp_path, stop=[sys.executable, str(cmds.hang), str(pids)], timeout=1.0)
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"did not finish within 1s; killed its process group; output: about"):
        await backend.stop(ActionContext(worker="qwen", action="stop"))
    assert 0.9 <= time.monotonic() - started < 10.0
    command, grandchild = (int(p) for p in pids.read_text().split())
    assert not alive(command)
    for _ in range(250):  # the group was killed; the grandchild is reaped by its new parent shortly
        if not alive(grandchild):
            break
        await asyncio.sleep(0.02)
    assert not alive(grandchild)


async def test_missing_program_is_a_backend_error(tmp_path: Path) -> None:
    backend = CommandBackend("qwen", state_dir=tmp_path, stop=[str(tmp_path / "nope")])
    with pytest.raises(BackendError, match="cannot run stop command"):
        await backend.stop(ActionContext(worker="qwen", action="stop"))


async def test_nul_in_a_label_is_replaced_not_fatal(cmds: Commands, tmp_path: Path) -> None:
    backend = CommandBackend("qwen", state_dir=tmp_path, stop=cmds.argv("stop"))
    await backend.stop(ActionContext(worker="qwen", action="stop", labels={"job": "a\0b"}))
    assert cmds.calls()[0]["env"]["SENTINEL_LABEL_JOB"] == "a\ufffdb"


async def test_state_is_unknown_without_a_status_command(cmds: Commands, tmp_path: Path) -> None:
    backend = CommandBackend("qwen", state_dir=tmp_path, restart=cmds.argv("restart"))
    assert (await backend.state()).state == "unknown"


@pytest.mark.parametrize(("code", "state"), [("0", "active"), ("3", "inactive"), ("1", "failed"), ("4", "unknown")])
async def test_status_command_exit_code_follows_lsb(cmds: Commands, tmp_path: Path, code: str, state: str) -> None:
    status = [sys.executable, "-c", f"import sys; sys.exit({code})"]
    backend = CommandBackend("qwen", state_dir=tmp_path, restart=cmds.argv("restart"), status=status)
    got = await backend.state()
    assert got.state == state
    assert got == UnitState(state, f"status command exited with status {code}")


def test_build_backend_wires_the_configured_commands(tmp_path: Path) -> None:
    from sentinel.config.models import WorkerConfig
    from sentinel.remediation.backends import build_backend

    worker = WorkerConfig.model_validate(
        {"name": "qwen", "backend": {"type": "command", "restart": ["/usr/local/bin/restart-qwen"], "timeout": "1m"}}
    )
    backend = build_backend(worker, tmp_path)
    assert isinstance(backend, CommandBackend)
    assert backend.commands == {"restart": ("/usr/local/bin/restart-qwen",)}
    assert backend.timeout == 60.0
