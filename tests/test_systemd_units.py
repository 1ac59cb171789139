"""systemd/: the units verify clean, Sentinel's sandbox rates 3.0 or better, and the
polkit rule, sysusers and tmpfiles files do what their comments say.

`systemd-analyze verify` insists that every ExecStart= program exists. The units name
their production paths (/opt/sentinel/bin/sentinel, /opt/vllm/bin/vllm); the test
verifies a copy in which Sentinel's is this checkout's real `sentinel` entry point and
vLLM's a stub script, everything else as shipped.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sentinel.remediation.settings import SystemdBackendConfig
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "systemd"
SENTINEL_UNIT = SYSTEMD / "sentinel.service"
WORKER_UNIT = SYSTEMD / "vllm@.service"
POLKIT_RULE = SYSTEMD / "sentinel-polkit.rules"
MAX_EXPOSURE = 3.0

pytestmark = pytest.mark.integration


def directives(unit: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (repeated keys kept in order, continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", unit.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def resolvable_copies(tmp_path: Path) -> list[Path]:
    """The two units with ExecStart= programs that exist here (see the module docstring)."""
    sentinel = Path(sys.executable).with_name("sentinel")
    assert sentinel.is_file(), f"{sentinel}: install the package (pip install -e .)"
    stub = tmp_path / "vllm"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copies = []
    for unit, production, here in (
        (SENTINEL_UNIT, "/opt/sentinel/bin/sentinel", sentinel),
        (WORKER_UNIT, "/opt/vllm/bin/vllm", stub),
    ):
        text = unit.read_text()
        assert f"ExecStart={production} " in text
        copy = tmp_path / unit.name
        copy.write_text(text.replace(f"ExecStart={production} ", f"ExecStart={here} "))
        copies.append(copy)
    return copies


def test_units_verify_without_a_single_warning(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    done = subprocess.run(
        [analyze, "verify", *map(str, resolvable_copies(tmp_path))], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_would_catch_a_mistyped_directive(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    [sentinel, _] = resolvable_copies(tmp_path)
    sentinel.write_text(sentinel.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes"))
    done = subprocess.run([analyze, "verify", str(sentinel)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'ProtectHomes'" in done.stderr


def test_sentinel_sandbox_rates_at_most_3_0() -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    # --threshold is in tenths (0..100): the exit status is non-zero above it.
    done = subprocess.run(
        [
            analyze,
            "security",
            "--offline=true",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            "--no-pager",
            str(SENTINEL_UNIT),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for sentinel\.service: (\d+\.\d)", done.stdout)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE
    assert done.returncode == 0, done.stdout + done.stderr


def test_sentinel_unit_is_a_notify_service_with_watchdog_state_and_credentials() -> None:
    d = directives(SENTINEL_UNIT)
    assert d["Type"] == ["notify"]
    assert d["WatchdogSec"] and d["Restart"] == ["on-failure"]
    assert d["User"] == ["sentinel"] and "DynamicUser" not in d  # polkit names the user
    assert "sentinel" in d["StateDirectory"][0].split()
    assert d["LoadCredential"] and all(":" in c for c in d["LoadCredential"])
    assert d["ExecStart"][0].split()[1:3] == ["run", "-c"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_sentinel_sandbox_keeps_the_nvidia_devices_the_journal_and_dbus() -> None:
    d = directives(SENTINEL_UNIT)
    assert d["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0]: v.split()[1] for v in d["DeviceAllow"]}
    assert allowed["/dev/nvidiactl"] == "rw" and allowed["char-nvidia-frontend"] == "rw"
    assert d.get("PrivateDevices", ["no"]) == ["no"]  # a private /dev has no /dev/nvidia*
    assert {"systemd-journal", "adm"} <= set(d["SupplementaryGroups"][0].split())
    assert "AF_UNIX" in d["RestrictAddressFamilies"][0].split()  # D-Bus and $NOTIFY_SOCKET
    assert d["ProtectProc"] == ["default"]  # the workers run as other users
    assert d["ProtectKernelLogs"] == ["yes"]  # the kernel log comes from the journal


def test_sentinel_unit_bounds_memory_tasks_and_descriptors_and_dies_before_a_worker() -> None:
    from sentinel.api.settings import HttpConfig

    d = directives(SENTINEL_UNIT)

    def size(value: str) -> int:
        units = {"K": 1024, "M": 1024**2, "G": 1024**3}
        return int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)

    assert 0 < size(d["MemoryHigh"][0]) < size(d["MemoryMax"][0])
    assert size(d["MemoryHigh"][0]) >= 512 * 1024**2  # well above the 107 MiB measured under attack
    assert int(d["TasksMax"][0]) >= 64
    # The connection cap and the probe socket's 64 must fit, with room for everything else.
    assert int(d["LimitNOFILE"][0]) >= 2 * (HttpConfig().max_connections + 64)
    # Higher than a worker's default 0: the OOM killer picks Sentinel first.
    assert int(d["OOMScoreAdjust"][0]) > 0
    assert "OOMScoreAdjust" not in directives(WORKER_UNIT)


def test_the_probe_socket_directory_is_reachable_by_the_workers_group_only(tmp_path: Path) -> None:
    d = directives(SENTINEL_UNIT)
    assert d["RuntimeDirectory"] == ["sentinel"] and d["RuntimeDirectoryMode"] == ["0750"]
    tmpfiles = (SYSTEMD / "sentinel.tmpfiles").read_text()
    assert "d /run/sentinel             0750 sentinel sentinel -" in tmpfiles


def test_worker_unit_reads_the_profile_sentinel_writes() -> None:
    d = directives(WORKER_UNIT)
    profile_file = "-/var/lib/sentinel/profiles/%i.env"
    assert d["EnvironmentFile"][-1] == profile_file  # last: the profile wins
    assert "${MAX_NUM_SEQS}" in d["ExecStart"][0] and "$PROFILE_ARGS" in d["ExecStart"][0]
    # Sentinel's StateDirectory= is where it may write: the profiles live under it.
    assert "sentinel/profiles" in directives(SENTINEL_UNIT)["StateDirectory"][0].split()
    # The example worker in the unit's comment is a valid backend config.
    backend = SystemdBackendConfig(
        type="systemd", unit="vllm@qwen3.service", env_file=profile_file[1:].replace("%i", "qwen3")
    )
    assert backend.env_file == "/var/lib/sentinel/profiles/qwen3.env"


POLKIT_CASES = [
    ("sentinel", "org.freedesktop.systemd1.manage-units", "vllm@qwen3.service", "restart", "yes"),
    ("sentinel", "org.freedesktop.systemd1.manage-units", "vllm@qwen3.service", "start", "yes"),
    ("sentinel", "org.freedesktop.systemd1.manage-units", "vllm@qwen3.service", "stop", "yes"),
    ("sentinel", "org.freedesktop.systemd1.manage-units", "vllm@qwen3.service", "kill", None),
    ("sentinel", "org.freedesktop.systemd1.manage-units", "vllm@qwen3.service", "enable", None),
    ("sentinel", "org.freedesktop.systemd1.manage-units", "sshd.service", "restart", None),
    ("sentinel", "org.freedesktop.systemd1.manage-units", "vllm@.service", "restart", None),
    ("sentinel", "org.freedesktop.systemd1.manage-units", "vllm@x.service.d/../sshd.service", "restart", None),
    ("sentinel", "org.freedesktop.systemd1.manage-unit-files", "vllm@qwen3.service", "enable", None),
    ("sentinel", "org.freedesktop.login1.reboot", None, None, None),
    ("vllm", "org.freedesktop.systemd1.manage-units", "vllm@qwen3.service", "restart", None),
]

NODE_HARNESS = """
const fs = require("fs");
let rule = null;
const polkit = {Result: {YES: "yes", NO: "no", AUTH_ADMIN: "auth_admin", NOT_HANDLED: null},
                addRule: (f) => { rule = f; }, log: () => {}};
new Function("polkit", fs.readFileSync(process.argv[1], "utf8"))(polkit);
const cases = JSON.parse(process.argv[2]);
console.log(JSON.stringify(cases.map(([user, id, unit, verb]) => {
  const details = {unit: unit, verb: verb};
  const action = {id: id, lookup: (k) => (details[k] === null ? undefined : details[k])};
  const r = rule(action, {user: user});
  return r === undefined ? null : r;
})));
"""


def test_polkit_rule_lets_sentinel_only_start_stop_and_restart_workers() -> None:
    node = require_tool("node", "nodejs")
    cases = [list(c[:4]) for c in POLKIT_CASES]
    done = subprocess.run(
        [node, "-e", NODE_HARNESS, str(POLKIT_RULE), json.dumps(cases)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [c[4] for c in POLKIT_CASES]


def test_sysusers_and_tmpfiles_apply_to_an_empty_root(tmp_path: Path) -> None:
    sysusers = require_tool("systemd-sysusers", "systemd")
    tmpfiles = require_tool("systemd-tmpfiles", "systemd")
    (tmp_path / "etc").mkdir()
    for argv in (
        [sysusers, f"--root={tmp_path}", str(SYSTEMD / "sentinel.sysusers")],
        [tmpfiles, f"--root={tmp_path}", "--create", str(SYSTEMD / "sentinel.tmpfiles")],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    users = {line.split(":")[0] for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert {"sentinel", "vllm"} <= users
    group = {line.split(":")[0]: line.split(":")[3] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert "vllm" in group["sentinel"].split(",")
    assert (tmp_path / "etc" / "sentinel" / "credentials").stat().st_mode & 0o777 == 0o700
