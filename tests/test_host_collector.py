"""HostCollector: host memory/CPU/load, worker process series and OOM-kill events."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from sentinel.collectors.base import Collector, CollectorRunner, CollectorUnavailable
from sentinel.collectors.host import HostCollector
from sentinel.collectors.workers import WorkerProcesses, WorkerProcs
from sentinel.config.models import HostCollectorConfig, ProcessMatch, WorkerConfig
from sentinel.store import Store
from sentinel.store.events import Event, EventBus

UNIT = "vllm@qwen3.service"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
BTIME = 1_700_000_000


class FakeHost:
    """A /proc tree (host files and processes) and a cgroup v2 tree of real files."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.cgroup = root / "cgroup"
        self.proc.mkdir()
        self.cgroup.mkdir()
        self.set_cpu(user=1000, system=500, idle=8000, iowait=500)
        (self.proc / "meminfo").write_text(
            "MemTotal:       65536000 kB\n"
            "MemFree:        10000000 kB\n"
            "MemAvailable:   40000000 kB\n"
            "Buffers:          100000 kB\n"
            "SwapTotal:       8000000 kB\n"
            "SwapFree:        6000000 kB\n"
            "HugePages_Total:       0\n"
        )
        (self.proc / "loadavg").write_text("3.25 2.00 1.50 4/900 12345\n")
        self.set_host_oom(0)

    def set_cpu(self, user: int, system: int, idle: int, iowait: int, steal: int = 0) -> None:
        (self.proc / "stat").write_text(
            f"cpu  {user} 0 {system} {idle} {iowait} 0 0 {steal} 0 0\n"
            f"cpu0 {user} 0 {system} {idle} {iowait} 0 0 {steal} 0 0\n"
            f"intr 0\nctxt 0\nbtime {BTIME}\nprocesses 1000\n"
        )

    def set_host_oom(self, kills: int) -> None:
        (self.proc / "vmstat").write_text(f"nr_free_pages 100\npgfault 5\noom_kill {kills}\n")

    def add(
        self,
        pid: int,
        ppid: int,
        cmdline: Sequence[str],
        cgroup: str = f"/system.slice/{UNIT}",
        *,
        utime: int = 0,
        stime: int = 0,
        cutime: int = 0,
        rss_pages: int = 0,
        start: int = 1000,
        state: str = "S",
    ) -> None:
        d = self.proc / str(pid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_text(
            f"{pid} (python3) {state} {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0 {utime} {stime} {cutime} 0 "
            f"20 0 4 0 {start} 1000000 {rss_pages} 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0\n"
        )
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in cmdline))
        (d / "cgroup").write_text(f"0::{cgroup}\n")

    def remove(self, pid: int) -> None:
        for f in (self.proc / str(pid)).iterdir():
            f.unlink()
        (self.proc / str(pid)).rmdir()

    def set_memory_events(self, cgroup: str, oom_kill: int) -> None:
        d = self.cgroup / cgroup.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.events").write_text(f"low 0\nhigh 0\nmax 12\noom 3\noom_kill {oom_kill}\noom_group_kill 0\n")


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    host = FakeHost(tmp_path)
    host.add(1, 0, ["/sbin/init"], "/init.scope", start=1)
    return host


def vllm(fake: FakeHost) -> None:
    fake.add(
        100,
        1,
        ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        utime=300,
        stime=100,
        rss_pages=1000,
        start=5000,
    )
    fake.add(101, 100, ["VLLM::EngineCore"], utime=200, stime=50, rss_pages=3000, start=5100)
    fake.add(102, 101, ["VLLM::Worker_TP0"], utime=900, stime=100, rss_pages=6000, start=5200)


def unit_worker(name: str = "qwen3", unit: str = UNIT) -> WorkerConfig:
    return WorkerConfig(name=name, process=ProcessMatch(systemd_unit=unit))


class Harness:
    def __init__(self, fake: FakeHost, *workers: WorkerConfig, wp: WorkerProcesses | None = None) -> None:
        self.store = Store()
        self.bus = EventBus()
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        config = HostCollectorConfig(proc_root=str(fake.proc), cgroup_root=str(fake.cgroup))
        self.workers = wp or WorkerProcesses(workers, proc_root=str(fake.proc), cgroup_root=str(fake.cgroup))
        self.collector = HostCollector(config, self.workers, self.store, self.bus)

    async def collect(self) -> None:
        out = self.store.appender(self.collector.name)
        await self.collector.collect(out)
        out.commit()

    def value(self, name: str, **labels: str) -> float | None:
        for sample in self.store.latest(name):
            if {k: v for k, v in sample.labels if k != "__name__"} == labels:
                return sample.value
        return None


# -- host-wide series -------------------------------------------------------------------


async def test_host_memory_load_and_cpu_come_from_proc_files(fake: FakeHost) -> None:
    h = Harness(fake)
    assert isinstance(h.collector, Collector)
    await h.collector.start()
    fake.set_cpu(user=1300, system=600, idle=8500, iowait=600)  # 400 busy of 1000 ticks
    await h.collect()
    assert h.value("sentinel_host_cpu_utilization_ratio") == pytest.approx(0.4)
    assert h.value("sentinel_host_memory_total_bytes") == 65536000 * 1024
    assert h.value("sentinel_host_memory_available_bytes") == 40000000 * 1024
    assert h.value("sentinel_host_memory_used_bytes") == (65536000 - 40000000) * 1024
    assert h.value("sentinel_host_swap_used_bytes") == 2000000 * 1024
    assert h.value("sentinel_host_load1") == 3.25
    assert h.value("sentinel_host_oom_kills_total") == 0


async def test_every_series_is_declared_with_its_type(fake: FakeHost) -> None:
    h = Harness(fake)
    for name in (
        "sentinel_host_oom_kills_total",
        "sentinel_worker_oom_kills_total",
        "sentinel_worker_process_cpu_seconds_total",
    ):
        meta = h.store.meta(name)
        assert meta is not None and meta.type == "counter" and meta.help
    for name in ("sentinel_host_memory_used_bytes", "sentinel_worker_up", "sentinel_host_load1"):
        meta = h.store.meta(name)
        assert meta is not None and meta.type == "gauge"


async def test_cpu_utilization_without_a_baseline_waits_for_the_second_pass(fake: FakeHost) -> None:
    h = Harness(fake)
    await h.collect()
    assert h.value("sentinel_host_cpu_utilization_ratio") is None
    fake.set_cpu(user=1200, system=500, idle=8800, iowait=500)  # 200 busy of 1000 ticks
    await h.collect()
    assert h.value("sentinel_host_cpu_utilization_ratio") == pytest.approx(0.2)


async def test_unreadable_vmstat_and_memory_events_leave_fields_absent_and_log_once(
    fake: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    vllm(fake)
    (fake.proc / "vmstat").unlink()  # and no memory.events for the worker's cgroup
    h = Harness(fake, unit_worker())
    with caplog.at_level(logging.WARNING, logger="sentinel.collectors.host"):
        for _ in range(3):
            await h.collect()
    assert h.value("sentinel_host_oom_kills_total") is None
    assert h.value("sentinel_worker_oom_kills_total", worker="qwen3") is None
    assert h.value("sentinel_worker_up", worker="qwen3") == 1
    assert h.value("sentinel_host_memory_total_bytes") is not None
    warnings = [r.getMessage() for r in caplog.records]
    assert len([m for m in warnings if "proc/vmstat" in m]) == 1
    assert len([m for m in warnings if "memory.events" in m]) == 1
    assert len(warnings) == 2


async def test_unlistable_proc_root_makes_the_collector_unavailable(tmp_path: Path) -> None:
    config = HostCollectorConfig(proc_root=str(tmp_path / "absent"))
    wp = WorkerProcesses([unit_worker()], proc_root=str(tmp_path / "absent"))
    collector = HostCollector(config, wp, Store(), EventBus())
    with pytest.raises(CollectorUnavailable):
        await collector.collect(Store().appender("host"))


async def test_collector_runs_under_the_runner_and_reports_up(fake: FakeHost) -> None:
    h = Harness(fake, unit_worker())
    runner = CollectorRunner(h.collector, h.store)
    await runner.tick()
    assert runner.health.up, runner.health.last_error
    assert h.value("sentinel_collector_up", collector="host") == 1
    assert h.value("sentinel_worker_up", worker="qwen3") == 0


# -- worker series ----------------------------------------------------------------------


async def test_worker_series_sum_rss_and_cpu_over_the_process_tree(fake: FakeHost) -> None:
    vllm(fake)
    fake.add(200, 1, ["unrelated"], "/system.slice/other.service", utime=10_000, rss_pages=99_999)
    h = Harness(fake, unit_worker())
    await h.collect()
    assert h.value("sentinel_worker_up", worker="qwen3") == 1
    assert h.value("sentinel_worker_processes", worker="qwen3") == 3
    assert h.value("sentinel_worker_process_rss_bytes", worker="qwen3") == 10_000 * PAGE
    assert h.value("sentinel_worker_process_cpu_seconds_total", worker="qwen3") == pytest.approx(1650 / CLK_TCK)
    assert h.value("sentinel_worker_process_start_time_seconds", worker="qwen3") == pytest.approx(
        BTIME + 5000 / CLK_TCK
    )


async def test_worker_without_processes_is_down_and_the_pass_succeeds(fake: FakeHost) -> None:
    h = Harness(fake, unit_worker())
    await h.collect()
    assert h.value("sentinel_worker_up", worker="qwen3") == 0
    assert h.value("sentinel_worker_processes", worker="qwen3") == 0
    assert h.value("sentinel_worker_process_rss_bytes", worker="qwen3") is None


async def test_worker_series_go_stale_when_the_worker_stops(fake: FakeHost) -> None:
    vllm(fake)
    h = Harness(fake, unit_worker())
    await h.collect()
    assert h.value("sentinel_worker_process_rss_bytes", worker="qwen3") is not None
    for pid in (102, 101, 100):
        fake.remove(pid)
    await asyncio.sleep(0.002)  # a later timestamp for the staleness marker
    await h.collect()
    assert h.value("sentinel_worker_up", worker="qwen3") == 0
    assert h.value("sentinel_worker_process_rss_bytes", worker="qwen3") is None


async def test_cpu_counter_does_not_go_down_when_a_gpu_worker_process_exits(fake: FakeHost) -> None:
    vllm(fake)
    h = Harness(fake, unit_worker())
    await h.collect()
    before = h.value("sentinel_worker_process_cpu_seconds_total", worker="qwen3")
    fake.remove(102)  # exited and was not reaped into a parent's cutime: its 1000 ticks are gone
    await h.collect()
    assert h.value("sentinel_worker_process_cpu_seconds_total", worker="qwen3") == before
    fake.add(100, 1, ["python3", "-m", "vllm.entrypoints.openai.api_server"], utime=310, stime=100, start=5000)
    await h.collect()
    after = h.value("sentinel_worker_process_cpu_seconds_total", worker="qwen3")
    assert before is not None and after is not None
    assert after == pytest.approx(before + 10 / CLK_TCK)  # and it keeps counting from there


async def test_cpu_of_reaped_children_stays_in_the_counter(fake: FakeHost) -> None:
    vllm(fake)
    h = Harness(fake, unit_worker())
    await h.collect()
    fake.remove(102)
    fake.add(101, 100, ["VLLM::EngineCore"], utime=200, stime=50, cutime=1000, rss_pages=3000, start=5100)
    await h.collect()
    assert h.value("sentinel_worker_process_cpu_seconds_total", worker="qwen3") == pytest.approx(1650 / CLK_TCK)


async def test_cpu_counter_resets_when_the_worker_restarts(fake: FakeHost) -> None:
    vllm(fake)
    h = Harness(fake, unit_worker())
    await h.collect()
    for pid in (102, 101, 100):
        fake.remove(pid)
    fake.add(300, 1, ["python3", "-m", "vllm.entrypoints.openai.api_server"], utime=5, stime=5, start=90000)
    await h.collect()
    await h.collect()  # a new process is matched from its second pass on
    assert h.value("sentinel_worker_process_cpu_seconds_total", worker="qwen3") == pytest.approx(10 / CLK_TCK)


async def test_processes_vanishing_between_resolve_and_read_do_not_raise(fake: FakeHost) -> None:
    vllm(fake)

    class VanishingAfterResolve(WorkerProcesses):
        """Every process exits right after it was found: the race the kernel allows."""

        def resolve(self) -> dict[str, WorkerProcs]:
            result = super().resolve()
            for pid in (102, 101, 100):
                fake.remove(pid)
            return result

    wp = VanishingAfterResolve([unit_worker()], proc_root=str(fake.proc), cgroup_root=str(fake.cgroup))
    fake.set_memory_events(f"/system.slice/{UNIT}", 0)
    h = Harness(fake, wp=wp)
    await h.collect()
    assert h.value("sentinel_worker_up", worker="qwen3") == 0
    assert h.value("sentinel_worker_processes", worker="qwen3") == 0


# -- OOM kills --------------------------------------------------------------------------


async def test_oom_kill_in_worker_cgroup_publishes_one_event_and_increments_the_counter(fake: FakeHost) -> None:
    vllm(fake)
    fake.set_memory_events(f"/system.slice/{UNIT}", 2)  # kills from before Sentinel started
    h = Harness(fake, unit_worker())
    await h.collect()
    assert h.events == []
    assert h.value("sentinel_worker_oom_kills_total", worker="qwen3") == 2

    fake.set_memory_events(f"/system.slice/{UNIT}", 3)
    await h.collect()
    assert len(h.events) == 1
    event = h.events[0]
    assert (event.kind, event.source, dict(event.labels), event.value) == (
        "host_oom_kill",
        "host",
        {"worker": "qwen3"},
        3,
    )
    assert event.metrics == ("sentinel_worker_oom_kills_total",)
    assert h.value("sentinel_worker_oom_kills_total", worker="qwen3") == 3

    await h.collect()
    assert len(h.events) == 1


async def test_host_wide_oom_kill_publishes_an_event_without_worker_label(fake: FakeHost) -> None:
    fake.set_host_oom(7)
    h = Harness(fake)
    await h.collect()
    assert h.events == []
    fake.set_host_oom(9)
    await h.collect()
    assert [(e.kind, dict(e.labels), e.value, e.metrics) for e in h.events] == [
        ("host_oom_kill", {}, 9, ("sentinel_host_oom_kills_total",))
    ]
    assert h.value("sentinel_host_oom_kills_total") == 9


async def test_subscriber_sees_the_new_oom_counter_when_the_event_arrives(fake: FakeHost) -> None:
    vllm(fake)
    fake.set_memory_events(f"/system.slice/{UNIT}", 0)
    h = Harness(fake, unit_worker())
    seen: list[float | None] = []
    h.bus.subscribe(lambda e: seen.append(h.value("sentinel_worker_oom_kills_total", worker="qwen3")))
    await h.collect()
    fake.set_memory_events(f"/system.slice/{UNIT}", 1)
    await asyncio.sleep(0.002)  # a later pass timestamp
    await h.collect()
    assert seen == [1]


async def test_recreated_unit_cgroup_with_a_kill_publishes_an_event(fake: FakeHost) -> None:
    vllm(fake)
    fake.set_memory_events(f"/system.slice/{UNIT}", 4)
    h = Harness(fake, unit_worker())
    await h.collect()
    # systemd restarted the unit: a fresh cgroup at the same path, already with one kill.
    fake.set_memory_events(f"/system.slice/{UNIT}", 1)
    await h.collect()
    assert [(dict(e.labels), e.value) for e in h.events] == [({"worker": "qwen3"}, 1)]


async def test_worker_moving_to_another_cgroup_takes_a_new_baseline(fake: FakeHost) -> None:
    fake.add(100, 1, ["vllm", "serve"], "/user.slice/session-1.scope")
    fake.set_memory_events("/user.slice/session-1.scope", 0)
    fake.set_memory_events("/user.slice/session-2.scope", 5)
    h = Harness(fake, WorkerConfig(name="w", process=ProcessMatch(cmdline="vllm serve")))
    await h.collect()
    fake.remove(100)
    await h.collect()
    fake.add(200, 1, ["vllm", "serve"], "/user.slice/session-2.scope", start=7000)
    await h.collect()
    await h.collect()  # a new process is matched from its second pass on
    assert h.events == []
    assert h.value("sentinel_worker_oom_kills_total", worker="w") == 5


# -- the real /proc ---------------------------------------------------------------------


def kill_leaving_zombie(proc: subprocess.Popen[bytes]) -> None:
    """Kill and wait for the exit without reaping: a zombie until proc.wait()."""
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)


def real_collector(*workers: WorkerConfig) -> tuple[HostCollector, Store]:
    store = Store()
    collector = HostCollector(HostCollectorConfig(), WorkerProcesses(workers), store, EventBus())
    return collector, store


async def real_pass(collector: HostCollector, store: Store) -> dict[tuple[str, str], float]:
    out = store.appender(collector.name)
    await collector.collect(out)
    out.commit()
    await asyncio.sleep(0.002)  # the next pass gets a later timestamp
    values = {}
    for name in ("sentinel_worker_up", "sentinel_worker_process_rss_bytes", "sentinel_worker_processes"):
        for sample in store.latest(name):
            values[(name, dict(sample.labels)["worker"])] = sample.value
    return values


async def test_real_subprocess_is_up_with_rss_then_down_after_kill(
    sleeper: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    proc, token = sleeper
    pid_file = tmp_path / "sleeper.pid"
    pid_file.write_text(str(proc.pid))
    collector, store = real_collector(
        WorkerConfig(name="by_cmdline", process=ProcessMatch(cmdline=token)),
        WorkerConfig(name="by_pid_file", process=ProcessMatch(pid_file=str(pid_file))),
    )
    await collector.start()
    values = await real_pass(collector, store)
    for w in ("by_cmdline", "by_pid_file"):
        assert values[("sentinel_worker_up", w)] == 1
        assert values[("sentinel_worker_processes", w)] == 1
        assert values[("sentinel_worker_process_rss_bytes", w)] > 0
    assert store.latest("sentinel_host_memory_total_bytes")[0].value > 0

    proc.kill()
    proc.wait()
    values = await real_pass(collector, store)
    for w in ("by_cmdline", "by_pid_file"):
        assert values[("sentinel_worker_up", w)] == 0
        assert ("sentinel_worker_process_rss_bytes", w) not in values


async def test_real_zombie_subprocess_counts_as_down(
    sleeper: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    proc, _ = sleeper
    pid_file = tmp_path / "sleeper.pid"
    pid_file.write_text(str(proc.pid))
    collector, store = real_collector(WorkerConfig(name="w", process=ProcessMatch(pid_file=str(pid_file))))
    assert (await real_pass(collector, store))[("sentinel_worker_up", "w")] == 1
    kill_leaving_zombie(proc)
    assert (await real_pass(collector, store))[("sentinel_worker_up", "w")] == 0
