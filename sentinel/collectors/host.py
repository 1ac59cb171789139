"""Host and worker-process collector: CPU, memory, load, worker processes, OOM kills.

Every value comes from plain files under the configured `proc_root` (`stat`, `meminfo`,
`loadavg`, `vmstat`, `PID/stat`) and the workers' cgroup v2 `memory.events`, read in one
`asyncio.to_thread` per pass. psutil is not used: its `PROCFS_PATH` is process-wide, so
it could not honour a per-instance `proc_root`, and it reads several files per process
where one `/proc/PID/stat` holds RSS, CPU ticks and the start time together.

OOM kills come from two counters: `/proc/vmstat` `oom_kill` (every kill on the host)
and the worker cgroup's `memory.events` `oom_kill` (kills inside the worker's cgroup and
below it). An increase publishes a `host_oom_kill` event so rules react at once. The
first reading of a counter is only a baseline: kills from before Sentinel watched raise
nothing. Known gap: when a worker's only process is killed and systemd removes and
re-creates the unit's cgroup before the next pass (RestartSec defaults to 100 ms), the
kill shows only in the host-wide counter; the kernel log's `oom-kill:...,oom_memcg=<cgroup>`
line names the cgroup in that case.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from sentinel.collectors.base import CollectorUnavailable
from sentinel.collectors.workers import WorkerProcesses, WorkerProcs, read_proc_file, read_stat
from sentinel.config.models import HostCollectorConfig
from sentinel.store import Appender, Store
from sentinel.store.events import Event, EventBus

__all__ = ["HostCollector", "OOM_EVENT_KIND", "declare_host_metrics"]

log = logging.getLogger(__name__)

OOM_EVENT_KIND = "host_oom_kill"

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_HOST_OOM = "sentinel_host_oom_kills_total"
_WORKER_OOM = "sentinel_worker_oom_kills_total"

_METRICS: tuple[tuple[str, str, str], ...] = (
    ("sentinel_host_cpu_utilization_ratio", "gauge", "Busy share of all CPUs since the previous pass (0..1)."),
    ("sentinel_host_memory_used_bytes", "gauge", "Host memory in use: MemTotal minus MemAvailable."),
    ("sentinel_host_memory_total_bytes", "gauge", "Host memory: MemTotal."),
    ("sentinel_host_memory_available_bytes", "gauge", "Memory available to new work without swapping: MemAvailable."),
    ("sentinel_host_swap_used_bytes", "gauge", "Swap in use: SwapTotal minus SwapFree."),
    ("sentinel_host_load1", "gauge", "One-minute load average."),
    (_HOST_OOM, "counter", "Processes killed by the kernel OOM killer since boot (/proc/vmstat oom_kill)."),
    ("sentinel_worker_up", "gauge", "1 when at least one process of the worker was found."),
    ("sentinel_worker_processes", "gauge", "Processes of the worker: the matched roots and their descendants."),
    ("sentinel_worker_process_rss_bytes", "gauge", "Resident memory summed over the worker's processes."),
    (
        "sentinel_worker_process_cpu_seconds_total",
        "counter",
        "User and system CPU of the worker's processes and the children they reaped; "
        "resets when the worker's root process changes.",
    ),
    ("sentinel_worker_process_start_time_seconds", "gauge", "Unix start time of the worker's (oldest) root process."),
    (_WORKER_OOM, "counter", "OOM kills in the worker's cgroup (memory.events oom_kill); resets with the cgroup."),
)


def declare_host_metrics(store: Store) -> None:
    """Declare type and help of every series this collector writes."""
    for name, type_, help_ in _METRICS:
        store.set_meta(name, type_, help_)


@dataclass
class _WorkerReading:
    procs: WorkerProcs
    processes: int = 0
    rss_bytes: int = 0
    cpu_ticks: int = 0
    root: tuple[int, int] | None = None  # (pid, start ticks) of the oldest live root
    oom_checked: bool = False
    oom_kills: int | None = None
    oom_problem: str | None = None


@dataclass
class _Reading:
    """Raw values of one pass, read in the worker thread; state changes happen on the loop."""

    cpu: tuple[int, int] | None = None  # (busy, total) ticks of all CPUs since boot
    btime: int | None = None
    meminfo: dict[str, int] = field(default_factory=dict)  # bytes
    load1: float | None = None
    host_oom_kills: int | None = None
    workers: dict[str, _WorkerReading] = field(default_factory=dict)
    checked: dict[str, str | None] = field(default_factory=dict)  # source read -> why unreadable, None if fine


@dataclass
class _CpuTrack:
    root: tuple[int, int] | None
    raw: int
    offset: int = 0


class HostCollector:
    """Host-wide and per-worker process metrics; name "host"."""

    name = "host"

    def __init__(self, config: HostCollectorConfig, workers: WorkerProcesses, store: Store, bus: EventBus) -> None:
        self.interval_s = config.interval
        self.timeout_s = config.timeout
        self._proc_root = config.proc_root.rstrip("/") or "/"
        self._workers = workers
        self._store = store
        self._bus = bus
        self._cpu_prev: tuple[int, int] | None = None
        self._cpu_tracks: dict[str, _CpuTrack] = {}
        self._host_oom: int | None = None
        self._worker_oom: dict[str, tuple[str, int]] = {}  # worker -> (cgroup dir, last count)
        self._problems: dict[str, str] = {}
        # A /proc read can block for a long time (cmdline waits on the target's mmap lock).
        # The runner's timeout abandons the pass but not its thread, so a new pass must not
        # start a second read behind a stuck one and pile threads into the executor.
        self._reading = threading.Lock()
        declare_host_metrics(store)

    async def start(self) -> None:
        """Take the CPU baseline so that the first pass already has a utilization."""
        self._cpu_prev = await asyncio.to_thread(self._read_cpu_only)

    async def close(self) -> None:
        """Nothing to release: every file is opened and closed within a pass."""

    async def collect(self, out: Appender) -> None:
        """One pass: read everything in a thread, then write series and publish OOM events here."""
        reading = await asyncio.to_thread(self._read)
        self._log_problems(reading.checked)
        self._write_host(out, reading)
        for name, worker in reading.workers.items():
            self._write_worker(out, name, worker, reading.btime)
        events = self._oom_events(reading)
        if events:
            # Subscribers (the rule engine) read the store as soon as they hear the event;
            # commit now so they see this pass's counters. The runner's own commit after
            # this method repeats the same samples at the same timestamp, which is a no-op.
            out.commit()
            for event in events:
                self._bus.publish(event)

    # -- reading (worker thread; no collector state is changed here) --------------

    def _read_cpu_only(self) -> tuple[int, int] | None:
        data = read_proc_file(f"{self._proc_root}/stat")
        return None if data is None else _parse_proc_stat(data)[0]

    def _read(self) -> _Reading:
        if not self._reading.acquire(blocking=False):
            raise CollectorUnavailable("the previous pass is still reading /proc (a read is blocked)")
        try:
            return self._read_locked()
        finally:
            self._reading.release()

    def _read_locked(self) -> _Reading:
        try:
            resolved = self._workers.resolve()
        except OSError as exc:
            raise CollectorUnavailable(f"cannot list processes under {self._workers.proc_root}: {exc}") from None
        r = _Reading()
        root = self._proc_root

        data = read_proc_file(f"{root}/stat")
        if data is not None:
            r.cpu, r.btime = _parse_proc_stat(data)
        r.checked["stat"] = None if r.cpu is not None else f"cannot read CPU times from {root}/stat"

        data = read_proc_file(f"{root}/meminfo")
        if data is not None:
            r.meminfo = _parse_meminfo(data)
        r.checked["meminfo"] = None if "MemTotal" in r.meminfo else f"cannot read {root}/meminfo"

        data = read_proc_file(f"{root}/loadavg")
        try:
            r.load1 = float(data.split()[0]) if data else None
        except ValueError:
            r.load1 = None
        r.checked["loadavg"] = None if r.load1 is not None else f"cannot read {root}/loadavg"

        data = read_proc_file(f"{root}/vmstat")
        r.host_oom_kills = _find_counter(data, b"oom_kill") if data is not None else None
        # oom_kill appeared in Linux 4.13; older kernels lack it.
        r.checked["vmstat"] = None if r.host_oom_kills is not None else f"no oom_kill counter in {root}/vmstat"

        for name, procs in resolved.items():
            w = r.workers[name] = self._read_worker(procs)
            if w.oom_checked:
                r.checked[f"memory.events of worker {name}"] = w.oom_problem
        return r

    def _read_worker(self, procs: WorkerProcs) -> _WorkerReading:
        w = _WorkerReading(procs)
        roots = set(procs.roots)
        for pid in procs.pids:
            st = read_stat(self._workers.proc_root, pid)
            if st is None or not st.alive:
                continue  # exited since it was resolved
            w.processes += 1
            w.rss_bytes += st.rss_pages * _PAGE_SIZE
            # Times of reaped children are included: when vLLM's engine process exits and
            # is waited for, its CPU moves into the parent's cutime instead of vanishing.
            w.cpu_ticks += st.utime_ticks + st.stime_ticks + st.cutime_ticks + st.cstime_ticks
            if pid in roots:
                key = (pid, st.starttime_ticks)
                if w.root is None or (key[1], key[0]) < (w.root[1], w.root[0]):
                    w.root = key
        if procs.cgroup_dir is not None and w.processes:
            path = os.path.join(procs.cgroup_dir, "memory.events")
            data = read_proc_file(path)
            w.oom_checked = True
            w.oom_kills = _find_counter(data, b"oom_kill") if data is not None else None
            if w.oom_kills is None:
                w.oom_problem = f"no oom_kill counter in {path} (worker {procs.name})"
        return w

    # -- writing (event loop thread) --------------------------------------------

    def _write_host(self, out: Appender, r: _Reading) -> None:
        if r.cpu is not None:
            prev, self._cpu_prev = self._cpu_prev, r.cpu
            if prev is not None:
                busy, total = r.cpu[0] - prev[0], r.cpu[1] - prev[1]
                if total > 0 and busy >= 0:
                    out.add("sentinel_host_cpu_utilization_ratio", min(busy / total, 1.0))
        mem = r.meminfo
        if "MemTotal" in mem:
            out.add("sentinel_host_memory_total_bytes", mem["MemTotal"])
            if "MemAvailable" in mem:
                out.add("sentinel_host_memory_available_bytes", mem["MemAvailable"])
                # total - available, as `free` (procps-ng 4) counts "used": page cache that
                # can be dropped is not used memory.
                out.add("sentinel_host_memory_used_bytes", max(mem["MemTotal"] - mem["MemAvailable"], 0))
        if "SwapTotal" in mem and "SwapFree" in mem:
            out.add("sentinel_host_swap_used_bytes", max(mem["SwapTotal"] - mem["SwapFree"], 0))
        if r.load1 is not None:
            out.add("sentinel_host_load1", r.load1)
        if r.host_oom_kills is not None:
            out.add(_HOST_OOM, r.host_oom_kills)

    def _write_worker(self, out: Appender, name: str, w: _WorkerReading, btime: int | None) -> None:
        labels = {"worker": name}
        out.add("sentinel_worker_up", 1.0 if w.processes else 0.0, labels)
        out.add("sentinel_worker_processes", w.processes, labels)
        if not w.processes:
            return
        out.add("sentinel_worker_process_rss_bytes", w.rss_bytes, labels)
        out.add("sentinel_worker_process_cpu_seconds_total", self._monotonic_cpu(name, w) / _CLK_TCK, labels)
        if w.root is not None and btime is not None:
            out.add("sentinel_worker_process_start_time_seconds", btime + w.root[1] / _CLK_TCK, labels)
        if w.oom_kills is not None:
            out.add(_WORKER_OOM, w.oom_kills, labels)

    def _monotonic_cpu(self, name: str, w: _WorkerReading) -> int:
        """CPU ticks that never go down while the same root process lives.

        The sum over live processes still drops when a process dies without being reaped
        by another process of the worker (re-parented to init), or when a child is reaped
        between reading it and reading its parent. A counter that goes down reads as a
        reset to Prometheus and makes `rate()` jump, so a drop is absorbed into an offset:
        that CPU time is lost to the counter, never counted twice. A new root process
        (the worker restarted) is a genuine reset.
        """
        track = self._cpu_tracks.get(name)
        if track is None or track.root != w.root:
            track = self._cpu_tracks[name] = _CpuTrack(w.root, w.cpu_ticks)
        elif w.cpu_ticks < track.raw:
            track.offset += track.raw - w.cpu_ticks
        track.raw = w.cpu_ticks
        return track.raw + track.offset

    def _oom_events(self, r: _Reading) -> list[Event]:
        events: list[Event] = []
        if r.host_oom_kills is not None:
            last, self._host_oom = self._host_oom, r.host_oom_kills
            if last is not None and r.host_oom_kills > last:
                events.append(
                    Event(
                        kind=OOM_EVENT_KIND,
                        source=self.name,
                        labels={},
                        value=float(r.host_oom_kills),
                        message=f"the kernel OOM killer killed {r.host_oom_kills - last} process(es) on this host",
                        metrics=(_HOST_OOM,),
                    )
                )
        for name, w in r.workers.items():
            if w.oom_kills is None or w.procs.cgroup_dir is None:
                continue  # keep the last reading: the cgroup may come back (a restart)
            cgroup, count = w.procs.cgroup_dir, w.oom_kills
            seen = self._worker_oom.get(name)
            self._worker_oom[name] = (cgroup, count)
            if seen is None or seen[0] != cgroup:
                continue  # first look at this cgroup: a baseline, its past kills are not news
            if count > seen[1]:
                new = count - seen[1]
            elif count < seen[1] and count > 0:
                # Same path, lower count: systemd re-created the unit's cgroup since the
                # last pass, so every kill it holds happened while we were watching.
                new = count
            else:
                continue
            events.append(
                Event(
                    kind=OOM_EVENT_KIND,
                    source=self.name,
                    labels={"worker": name},
                    value=float(count),
                    message=f"the OOM killer killed {new} process(es) in worker {name}'s cgroup {cgroup}",
                    metrics=(_WORKER_OOM,),
                )
            )
        return events

    def _log_problems(self, checked: Mapping[str, str | None]) -> None:
        """Log a source once when it becomes unreadable and once when it recovers.

        Only sources read this pass count: a worker that is down has no cgroup to read,
        which is neither a failure nor a recovery of its memory.events.
        """
        for key, problem in checked.items():
            before = self._problems.get(key)
            if problem is not None and problem != before:
                log.warning("host collector: %s; that value is not reported", problem)
            elif problem is None and before is not None:
                log.info("host collector: %s is readable again", key)
            if problem is None:
                self._problems.pop(key, None)
            else:
                self._problems[key] = problem


def _parse_proc_stat(data: bytes) -> tuple[tuple[int, int] | None, int | None]:
    """(busy, total) CPU ticks and the boot time from `/proc/stat`."""
    cpu: tuple[int, int] | None = None
    btime: int | None = None
    for line in data.splitlines():
        if line.startswith(b"cpu "):
            try:
                ticks = [int(x) for x in line.split()[1:]] + [0] * 10
            except ValueError:
                continue
            user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
            # guest and guest_nice are already part of user and nice: not added again.
            busy = user + nice + system + irq + softirq + steal
            cpu = (busy, busy + idle + iowait)
        elif line.startswith(b"btime "):
            try:
                btime = int(line.split()[1])
            except (ValueError, IndexError):
                btime = None
    return cpu, btime


def _parse_meminfo(data: bytes) -> dict[str, int]:
    """`/proc/meminfo` in bytes (its "kB" are KiB)."""
    out: dict[str, int] = {}
    for line in data.splitlines():
        key, _, rest = line.partition(b":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        out[key.decode("ascii", "replace")] = value * 1024 if parts[1:2] == [b"kB"] else value
    return out


def _find_counter(data: bytes, key: bytes) -> int | None:
    """The value of `key N` in a flat key/value file (`/proc/vmstat`, `memory.events`)."""
    for line in data.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            try:
                return int(parts[1])
            except ValueError:
                return None
    return None
