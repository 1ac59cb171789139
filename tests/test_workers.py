"""WorkerProcesses: finding worker process trees by pid file, systemd unit and command line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from sentinel.collectors.workers import WorkerProcesses, parse_stat, read_stat
from sentinel.config.models import ProcessMatch, WorkerConfig
from tests.support import FakeClock

UNIT = "vllm@qwen3.service"


class FakeProc:
    """A /proc and cgroup v2 tree of real files, as the kernel lays them out."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.cgroup = root / "cgroup"
        self.proc.mkdir()
        self.cgroup.mkdir()

    def add(
        self,
        pid: int,
        ppid: int = 1,
        cmdline: Sequence[str] = ("/usr/bin/python3",),
        cgroup: str | None = "/system.slice/other.service",
        *,
        state: str = "S",
        start: int = 1000,
        flags: int = 0x400100,
        comm: str = "python3",
    ) -> None:
        d = self.proc / str(pid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_text(
            f"{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 {flags} 10 0 0 0 5 3 0 0 20 0 4 0 {start} "
            "1000000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
        )
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in cmdline))
        lines = "12:memory:/legacy\n" + (f"0::{cgroup}\n" if cgroup is not None else "")
        (d / "cgroup").write_text(lines)

    def set_cmdline(self, pid: int, *argv: str) -> None:
        (self.proc / str(pid) / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))

    def remove(self, pid: int) -> None:
        shutil.rmtree(self.proc / str(pid))


def worker(name: str, **match: str) -> WorkerConfig:
    return WorkerConfig(name=name, process=ProcessMatch(**match))


def processes(fake: FakeProc, *workers: WorkerConfig, clock: FakeClock | None = None) -> WorkerProcesses:
    if clock is None:
        return WorkerProcesses(workers, proc_root=str(fake.proc), cgroup_root=str(fake.cgroup))
    return WorkerProcesses(workers, proc_root=str(fake.proc), cgroup_root=str(fake.cgroup), clock=clock)


def vllm_tree(fake: FakeProc, root: int = 100, cgroup: str = f"/system.slice/{UNIT}") -> None:
    """vLLM's layout: API server -> EngineCore -> one worker process per GPU."""
    fake.add(1, 0, ["/sbin/init"], "/init.scope")
    fake.add(root, 1, ["/opt/venv/bin/python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "Qwen3"], cgroup)
    fake.add(root + 1, root, ["VLLM::EngineCore"], cgroup)
    fake.add(root + 2, root + 1, ["VLLM::Worker_TP0"], cgroup)
    fake.add(root + 3, root + 1, ["VLLM::Worker_TP1"], cgroup)


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


# -- systemd unit -------------------------------------------------------------------


def test_systemd_unit_finds_every_process_in_the_units_cgroup(fake: FakeProc) -> None:
    vllm_tree(fake)
    fake.add(200, 1, ["python3", "-m", "vllm.entrypoints.openai.api_server"], "/system.slice/vllm@other.service")
    fake.add(300, 1, ["sleep", "1"], f"/system.slice/x{UNIT}")  # the name must be a whole segment
    procs = processes(fake, worker("qwen3", systemd_unit=UNIT)).resolve()["qwen3"]
    assert procs.up
    assert procs.pids == {100, 101, 102, 103}
    assert procs.roots == (100,)
    assert procs.cgroup_dir == os.path.join(fake.cgroup, "system.slice", UNIT)


def test_systemd_unit_with_delegated_subcgroup_reports_the_units_own_cgroup(fake: FakeProc) -> None:
    vllm_tree(fake, cgroup=f"/system.slice/{UNIT}/payload")
    procs = processes(fake, worker("qwen3", systemd_unit=UNIT)).resolve()["qwen3"]
    assert procs.pids == {100, 101, 102, 103}
    assert procs.cgroup_dir == os.path.join(fake.cgroup, "system.slice", UNIT)


def test_systemd_unit_on_cgroup_v1_only_host_matches_without_a_cgroup_dir(fake: FakeProc) -> None:
    fake.add(1, 0, ["/sbin/init"], None)
    fake.add(100, 1, ["vllm", "serve"], None)
    (fake.proc / "100" / "cgroup").write_text(f"4:memory:/system.slice/{UNIT}\n1:name=systemd:/system.slice/{UNIT}\n")
    procs = processes(fake, worker("qwen3", systemd_unit=UNIT)).resolve()["qwen3"]
    assert procs.pids == {100}
    assert procs.cgroup_dir is None


# -- command line -------------------------------------------------------------------


def test_cmdline_regex_includes_engine_and_gpu_workers_spawned_by_the_root(fake: FakeProc) -> None:
    vllm_tree(fake)
    fake.add(400, 1, ["python3", "train.py"])
    procs = processes(fake, worker("qwen3", cmdline=r"vllm\.entrypoints.*--model Qwen3")).resolve()["qwen3"]
    assert procs.roots == (100,)
    assert procs.pids == {100, 101, 102, 103}
    assert procs.cgroup_dir == os.path.join(fake.cgroup, "system.slice", UNIT)


def test_cmdline_matching_parent_and_child_keeps_only_the_parent_as_root(fake: FakeProc) -> None:
    fake.add(1, 0, ["/sbin/init"], "/init.scope")
    fake.add(100, 1, ["sglang", "launch_server"])
    fake.add(101, 100, ["sglang", "scheduler"])
    fake.add(200, 1, ["sglang", "launch_server", "--port", "31000"])
    procs = processes(fake, worker("s", cmdline="sglang")).resolve()["s"]
    assert procs.roots == (100, 200)
    assert procs.pids == {100, 101, 200}


def test_worker_in_root_cgroup_has_no_cgroup_dir(fake: FakeProc) -> None:
    fake.add(100, 1, ["vllm", "serve"], "/")
    assert processes(fake, worker("w", cmdline="vllm")).resolve()["w"].cgroup_dir is None


def test_cmdline_rewritten_by_a_wrapper_exec_is_seen_after_the_refresh_period(fake: FakeProc) -> None:
    clock = FakeClock(1000.0)
    fake.add(100, 1, ["/bin/bash", "/opt/start-worker.sh"])
    wp = processes(fake, worker("w", cmdline="vllm serve"), clock=clock)
    assert not wp.resolve()["w"].up
    clock.now += 1
    assert not wp.resolve()["w"].up  # second look at a new process: still the script
    # The script finally runs `exec vllm serve ...`: same pid, same start time.
    fake.set_cmdline(100, "/opt/venv/bin/python3", "/opt/venv/bin/vllm", "serve", "Qwen3")
    clock.now += 1
    assert not wp.resolve()["w"].up  # settled processes are not re-read every pass
    clock.now += 2 * 30.0
    assert wp.resolve()["w"].pids == {100}


def test_process_caught_between_fork_and_exec_is_matched_once_it_has_execd(fake: FakeProc) -> None:
    clock = FakeClock(1000.0)
    fake.add(1, 0, ["/sbin/init"], "/init.scope")
    wp = processes(fake, worker("qwen3", systemd_unit=UNIT), worker("c", cmdline="vllm serve"), clock=clock)
    wp.resolve()
    fake.add(100, 1, ["/sbin/init"], "/init.scope")  # systemd's child before exec
    clock.now += 1
    assert not wp.resolve()["qwen3"].up
    fake.add(100, 1, ["vllm", "serve"], f"/system.slice/{UNIT}")
    clock.now += 1
    result = wp.resolve()
    assert result["qwen3"].pids == {100}
    assert result["c"].pids == {100}


def test_new_process_is_matched_from_its_second_pass_and_its_children_at_once(fake: FakeProc) -> None:
    clock = FakeClock(1000.0)
    fake.add(1, 0, ["/sbin/init"], "/init.scope")
    wp = processes(fake, worker("w", cmdline="api_server"), clock=clock)
    wp.resolve()
    vllm_tree(fake)
    clock.now += 1
    assert not wp.resolve()["w"].up  # one pass late: its command line may not be final yet
    clock.now += 1
    assert wp.resolve()["w"].pids == {100, 101, 102, 103}
    fake.add(104, 101, ["VLLM::Worker_TP2"])
    clock.now += 1
    assert wp.resolve()["w"].pids == {100, 101, 102, 103, 104}  # descendants need no second look


def test_processes_running_at_startup_are_matched_on_the_first_pass(fake: FakeProc) -> None:
    vllm_tree(fake)
    assert processes(fake, worker("w", cmdline="api_server")).resolve()["w"].pids == {100, 101, 102, 103}


def test_settled_processes_are_not_reread_every_pass(fake: FakeProc) -> None:
    clock = FakeClock(1000.0)
    vllm_tree(fake)
    wp = processes(fake, worker("w", cmdline="api_server"), clock=clock)
    wp.resolve()
    clock.now += 1
    wp.resolve()
    # The cached command line and cgroup are used, not the files.
    for pid in (1, 100, 101, 102, 103):
        (fake.proc / str(pid) / "cmdline").unlink()
        (fake.proc / str(pid) / "cgroup").unlink()
    clock.now += 1
    assert wp.resolve()["w"].pids == {100, 101, 102, 103}


# -- pid file -----------------------------------------------------------------------


def test_pid_file_names_the_root_and_its_descendants_are_included(fake: FakeProc, tmp_path: Path) -> None:
    vllm_tree(fake)
    pid_file = tmp_path / "vllm.pid"
    pid_file.write_text("100\n")
    procs = processes(fake, worker("w", pid_file=str(pid_file))).resolve()["w"]
    assert procs.roots == (100,)
    assert procs.pids == {100, 101, 102, 103}


@pytest.mark.parametrize("content", [None, "", "not-a-pid\n", "-5", "4242\n"])
def test_pid_file_missing_garbled_or_naming_a_dead_pid_is_down(
    fake: FakeProc, tmp_path: Path, content: str | None
) -> None:
    vllm_tree(fake)
    pid_file = tmp_path / "vllm.pid"
    if content is not None:
        pid_file.write_text(content)
    procs = processes(fake, worker("w", pid_file=str(pid_file))).resolve()["w"]
    assert not procs.up
    assert procs.pids == frozenset()
    assert procs.roots == ()


def test_zombie_root_counts_as_down(fake: FakeProc, tmp_path: Path) -> None:
    fake.add(100, 1, ["vllm"], state="Z")
    pid_file = tmp_path / "vllm.pid"
    pid_file.write_text("100")
    assert not processes(fake, worker("w", pid_file=str(pid_file))).resolve()["w"].up


def test_kernel_thread_is_never_a_worker(fake: FakeProc, tmp_path: Path) -> None:
    fake.add(2, 0, [], "/", comm="kthreadd", flags=0x208040)
    pid_file = tmp_path / "w.pid"
    pid_file.write_text("2")
    assert not processes(fake, worker("w", pid_file=str(pid_file))).resolve()["w"].up


# -- processes that come and go ---------------------------------------------------------


def test_process_gone_between_listing_and_reading_is_skipped(fake: FakeProc) -> None:
    vllm_tree(fake)
    (fake.proc / "500").mkdir()  # listed, but its files are already gone
    (fake.proc / "101" / "cmdline").unlink()
    (fake.proc / "101" / "cgroup").unlink()
    result = processes(fake, worker("u", systemd_unit=UNIT), worker("c", cmdline="api_server")).resolve()
    # 101's cgroup and cmdline could not be read, but it is still a descendant of the root.
    assert result["u"].pids == {100, 101, 102, 103}
    assert result["c"].pids == {100, 101, 102, 103}


def test_reused_pid_is_a_new_process(fake: FakeProc) -> None:
    clock = FakeClock(1000.0)
    vllm_tree(fake)
    wp = processes(fake, worker("w", cmdline="api_server"), clock=clock)
    assert wp.resolve()["w"].up
    fake.remove(101)
    fake.remove(102)
    fake.remove(103)
    fake.add(100, 1, ["bash"], start=99999)  # the worker exited and its pid was handed out again
    clock.now += 1
    assert not wp.resolve()["w"].up


def test_child_reparented_after_root_exits_leaves_the_worker(fake: FakeProc) -> None:
    clock = FakeClock(1000.0)
    vllm_tree(fake)
    wp = processes(fake, worker("w", cmdline="api_server"), clock=clock)
    assert wp.resolve()["w"].pids == {100, 101, 102, 103}
    fake.remove(100)
    fake.add(101, 1, ["VLLM::EngineCore"])  # orphaned: init adopted it
    clock.now += 1
    assert not wp.resolve()["w"].up


def test_zombie_member_drops_out_on_the_next_pass(fake: FakeProc) -> None:
    clock = FakeClock(1000.0)
    vllm_tree(fake)
    wp = processes(fake, worker("w", systemd_unit=UNIT), clock=clock)
    wp.resolve()
    fake.add(103, 101, ["VLLM::Worker_TP1"], f"/system.slice/{UNIT}", state="Z")
    clock.now += 1
    assert wp.resolve()["w"].pids == {100, 101, 102}


def test_unlistable_proc_root_raises_oserror(tmp_path: Path) -> None:
    wp = WorkerProcesses([worker("w", cmdline="x")], proc_root=str(tmp_path / "absent"))
    with pytest.raises(OSError):
        wp.resolve()


# -- ownership ----------------------------------------------------------------------


def test_pid_owner_maps_every_pid_and_the_first_worker_wins_on_overlap(fake: FakeProc) -> None:
    vllm_tree(fake)
    fake.add(200, 1, ["sglang"], "/system.slice/sglang.service")
    wp = processes(fake, worker("a", systemd_unit=UNIT), worker("b", cmdline="VLLM::|sglang"))
    assert wp.pid_owner() == {}
    result = wp.resolve()
    assert result["b"].pids == {101, 102, 103, 200}
    assert wp.pid_owner() == {100: "a", 101: "a", 102: "a", 103: "a", 200: "b"}
    assert wp.latest() == result


def test_pid_owner_can_be_read_while_another_thread_resolves(fake: FakeProc) -> None:
    vllm_tree(fake)
    wp = processes(fake, worker("a", systemd_unit=UNIT))
    stop = threading.Event()
    errors: list[BaseException] = []

    def resolver() -> None:
        try:
            while not stop.is_set():
                wp.resolve()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    t = threading.Thread(target=resolver)
    t.start()
    try:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            owners = wp.pid_owner()
            assert owners in ({}, {100: "a", 101: "a", 102: "a", 103: "a"})
    finally:
        stop.set()
        t.join()
    assert errors == []


def test_worker_without_process_match_gets_no_entry(fake: FakeProc) -> None:
    vllm_tree(fake)
    wp = WorkerProcesses([WorkerConfig(name="remote")], proc_root=str(fake.proc))
    assert wp.resolve() == {}


# -- /proc/PID/stat ------------------------------------------------------------------


def test_stat_with_spaces_and_parentheses_in_comm_parses() -> None:
    line = b"42 (a) b (c)) R 7 42 42 0 -1 4194304 0 0 0 0 11 22 33 44 20 0 1 0 555 0 66 0\n"
    st = parse_stat(42, line)
    assert st is not None
    assert (st.state, st.ppid, st.starttime_ticks, st.rss_pages) == ("R", 7, 555, 66)
    assert (st.utime_ticks, st.stime_ticks, st.cutime_ticks, st.cstime_ticks) == (11, 22, 33, 44)
    assert parse_stat(1, b"garbage") is None


def test_read_stat_of_missing_process_is_none(tmp_path: Path) -> None:
    assert read_stat(str(tmp_path), 12345) is None


# -- the real /proc -------------------------------------------------------------------


def test_real_child_process_found_by_cmdline_and_pid_file_then_gone_after_kill(
    sleeper: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    proc, token = sleeper
    pid_file = tmp_path / "sleeper.pid"
    pid_file.write_text(f"{proc.pid}\n")
    wp = WorkerProcesses([worker("by_cmdline", cmdline=token), worker("by_pid_file", pid_file=str(pid_file))])
    result = wp.resolve()
    assert result["by_cmdline"].pids == {proc.pid}
    assert result["by_pid_file"].pids == {proc.pid}
    proc.kill()
    proc.wait()
    result = wp.resolve()
    assert not result["by_cmdline"].up
    assert not result["by_pid_file"].up


def test_real_grandchild_belongs_to_the_worker() -> None:
    token = f"sentinel-test-{uuid.uuid4().hex}"
    script = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, token], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        procs = WorkerProcesses([worker("w", cmdline=token)]).resolve()["w"]
        assert procs.roots == (parent.pid,)
        assert procs.pids == {parent.pid, child}
    finally:
        os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
        parent.stdout.close()
