"""Finding each worker's processes: by pid file, systemd unit or command line.

A worker is a process tree: vLLM's API server is the root, and the EngineCore and GPU
worker processes it spawns are the ones that hold the GPUs. So a match names the *root*
processes and every descendant of a root belongs to the worker too.

Everything is read straight from files under `proc_root` (`/proc/PID/stat`, `cmdline`,
`cgroup`) rather than through psutil: psutil's `PROCFS_PATH` is a process-wide global, so
a test could not point one instance at a fake tree, and one read of `stat` already gives
everything needed (parent, state, start time, CPU ticks, RSS) where psutil reads several
files per process.

Cost. The daemon polls every second on hosts with thousands of processes (kernel
threads included), and reading three files for each of them every pass would alone cost
over 1 % of a core. So each process is read when it first appears and cached; a pass then
costs one directory listing plus one `stat` read per new process. A new process's command
line and cgroup are read only from its second pass on: most short-lived processes
(compilers, `nvidia-smi`) are gone by then and cost one read, and a process caught
between fork and exec, which still shows its parent's command line and cgroup, has
exec'd by then. (Processes found by the very first pass are matched at once: they were
running before Sentinel started.) A cached process's `stat` is read again:
- when its parent disappears (it was re-parented);
- on every pass while it belongs to a worker, so a zombie or a reused pid drops out at once;
- every `refresh_s`..2*`refresh_s` seconds, spread by pid so that the re-reads do not
  all land in one pass; its command line and cgroup are then read again too, which
  catches a command line that changed long after the process started: a wrapper script
  that ends in `exec vllm serve ...`.
The residual blind spot is a pid that dies and is reused between two consecutive
listings while it belongs to no worker, which needs the pid space to wrap within one
interval.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sentinel.config.models import WorkerConfig

__all__ = [
    "DEFAULT_REFRESH_S",
    "ProcStat",
    "WorkerProcesses",
    "WorkerProcs",
    "parse_stat",
    "read_proc_file",
    "read_stat",
]

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 30.0

# include/linux/sched.h: set in the flags of every kernel thread. Checking the flag,
# not "parent is pid 2", keeps user processes of a container whose pid 2 is a real process.
_PF_KTHREAD = 0x00200000
_DEAD_STATES = frozenset({"Z", "X", "x"})


@dataclass(frozen=True)
class ProcStat:
    """The fields of `/proc/PID/stat` Sentinel uses; times are in clock ticks."""

    pid: int
    state: str
    ppid: int
    flags: int
    utime_ticks: int
    stime_ticks: int
    cutime_ticks: int  # CPU of children this process has waited for
    cstime_ticks: int
    starttime_ticks: int  # since boot; with the pid, identifies one process
    rss_pages: int

    @property
    def alive(self) -> bool:
        """False for a zombie: it has exited and only waits to be reaped."""
        return self.state not in _DEAD_STATES

    @property
    def kernel_thread(self) -> bool:
        """True for kernel threads, which are never part of a worker."""
        return bool(self.flags & _PF_KTHREAD)


def read_proc_file(path: str) -> bytes | None:
    """Whole content of a /proc or cgroup file, or None when it cannot be read.

    A process can exit between the listing and the read (ENOENT, or ESRCH once the file
    is open), and another user's files may be hidden (EACCES): all mean "not visible".
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def parse_stat(pid: int, data: bytes) -> ProcStat | None:
    """Parse one `/proc/PID/stat` line; None when it is malformed."""
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    end = data.rfind(b")")
    if end < 0:
        return None
    fields = data[end + 2 :].split()
    if len(fields) < 22:
        return None
    try:
        return ProcStat(
            pid=pid,
            state=fields[0].decode("ascii", "replace"),
            ppid=int(fields[1]),
            flags=int(fields[6]),
            utime_ticks=int(fields[11]),
            stime_ticks=int(fields[12]),
            cutime_ticks=int(fields[13]),
            cstime_ticks=int(fields[14]),
            starttime_ticks=int(fields[19]),
            rss_pages=max(int(fields[21]), 0),
        )
    except ValueError:
        return None


def read_stat(proc_root: str, pid: int) -> ProcStat | None:
    """`/proc/PID/stat` of one process under `proc_root`, or None when it is gone."""
    data = read_proc_file(f"{proc_root}/{pid}/stat")
    return None if data is None else parse_stat(pid, data)


@dataclass(frozen=True)
class WorkerProcs:
    """One worker's processes as found by the latest resolution."""

    name: str
    pids: frozenset[int]
    roots: tuple[int, ...]  # matched processes without a matched ancestor, sorted
    cgroup_dir: str | None  # cgroup v2 directory under cgroup_root, None if unknown

    @property
    def up(self) -> bool:
        """True when at least one process was found."""
        return bool(self.pids)


class _Entry:
    """What is cached about one live process; derived fields are read lazily."""

    __slots__ = ("cgroup", "cgroup_read", "cmd_hits", "eligible", "ppid", "recheck_at", "start", "unit_hits", "young")

    def __init__(self, stat: ProcStat, recheck_at: float, young: bool) -> None:
        self.recheck_at = recheck_at
        self.young = young  # first seen this pass: not matched by cgroup or cmdline yet
        self.start = stat.starttime_ticks
        self.ppid = stat.ppid
        # Plain attributes, not properties: the per-pass loops touch every process.
        self.eligible = stat.alive and not stat.kernel_thread
        self.cmd_hits: frozenset[str] | None = None  # cmdline workers whose regex matches; None: not read yet
        self.cgroup_read = False
        self.cgroup: str | None = None  # the v2 ("0::") path, None when the process has none
        self.unit_hits: dict[str, str] | None = None  # worker -> unit's cgroup path

    def update(self, stat: ProcStat) -> None:
        """Take a fresh stat of the same process (same pid and start time)."""
        self.ppid = stat.ppid
        self.eligible = stat.alive and not stat.kernel_thread

    def forget_derived(self) -> None:
        """Drop what exec or a cgroup move may have changed; it is read again on demand."""
        self.cmd_hits = None
        self.cgroup_read = False
        self.cgroup = None
        self.unit_hits = None


class WorkerProcesses:
    """Resolves configured workers to process trees; `resolve` blocks (run it in a thread).

    Workers without a `process:` match are not resolved: nothing here can tell whether
    they run, so they get no entry (rather than a false "down").
    """

    def __init__(
        self,
        workers: Sequence[WorkerConfig],
        proc_root: str = "/proc",
        cgroup_root: str = "/sys/fs/cgroup",
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_root = proc_root.rstrip("/") or "/"
        self.cgroup_root = cgroup_root
        self._refresh_s = refresh_s
        self._clock = clock
        self._order = [w.name for w in workers if w.process is not None]
        self._pid_files: dict[str, str] = {}
        self._units: dict[str, str] = {}
        self._regexes: dict[str, re.Pattern[str]] = {}
        for w in workers:
            match = w.process
            if match is None:
                continue
            if match.pid_file:
                self._pid_files[w.name] = match.pid_file
            elif match.systemd_unit:
                self._units[w.name] = match.systemd_unit
            elif match.cmdline:
                self._regexes[w.name] = re.compile(match.cmdline)
        self._resolve_lock = threading.Lock()  # one resolution at a time owns the cache
        self._cache: dict[int, _Entry] = {}
        self._members: frozenset[int] = frozenset()
        self._passes = 0
        self._warned: set[str] = set()
        self._result_lock = threading.Lock()
        self._latest: dict[str, WorkerProcs] = {}
        self._owners: dict[int, str] = {}

    # -- public ------------------------------------------------------------------

    def resolve(self) -> dict[str, WorkerProcs]:
        """Find every worker's processes now; raises OSError if `proc_root` cannot be listed."""
        with self._resolve_lock:
            result = self._resolve_locked()
        owners: dict[int, str] = {}
        for name in self._order:  # config order: with overlapping matches the first worker wins
            for pid in result[name].pids:
                owners.setdefault(pid, name)
        with self._result_lock:
            self._latest = result
            self._owners = owners
        return dict(result)

    def pid_owner(self) -> dict[int, str]:
        """pid -> worker name from the latest resolution (safe from any thread)."""
        with self._result_lock:
            return dict(self._owners)

    def latest(self) -> dict[str, WorkerProcs]:
        """The latest resolution without resolving again (safe from any thread)."""
        with self._result_lock:
            return dict(self._latest)

    # -- resolution ----------------------------------------------------------------

    def _resolve_locked(self) -> dict[str, WorkerProcs]:
        now = self._clock()
        live = {int(n) for n in os.listdir(self.proc_root) if n.isdigit()}
        self._refresh_cache(live, now)
        cache = self._cache

        # One loop over every process: parent links for the descendant walk, and the
        # unit and command-line matches (cached per process, so mostly dict lookups).
        children: dict[int, list[int]] = {}
        unit_matches: dict[str, dict[int, str]] = {name: {} for name in self._units}
        cmd_matches: dict[str, dict[int, str]] = {name: {} for name in self._regexes}
        units, regexes = bool(self._units), bool(self._regexes)
        for pid, entry in cache.items():
            if not entry.eligible:
                continue
            children.setdefault(entry.ppid, []).append(pid)
            if entry.young:
                continue
            if units:
                if not entry.cgroup_read:
                    self._read_cgroup(pid, entry)
                if entry.unit_hits:
                    for name, unit_dir in entry.unit_hits.items():
                        unit_matches[name][pid] = unit_dir
            if regexes:
                hits = entry.cmd_hits if entry.cmd_hits is not None else self._read_cmdline(pid, entry)
                for name in hits:
                    cmd_matches[name][pid] = ""

        result: dict[str, WorkerProcs] = {}
        for name in self._order:
            if name in self._pid_files:
                matched = self._pid_file_match(name, self._pid_files[name])
            elif name in self._units:
                matched = unit_matches[name]
            else:
                matched = cmd_matches[name]
            result[name] = self._worker(name, matched, children)
        self._members = frozenset(pid for procs in result.values() for pid in procs.pids)
        return result

    def _refresh_cache(self, live: set[int], now: float) -> None:
        cache = self._cache
        for pid in [p for p in cache if p not in live]:
            del cache[pid]
        first_pass = self._passes == 0
        self._passes += 1
        for pid in live:
            entry = cache.get(pid)
            if entry is None:
                stat = read_stat(self.proc_root, pid)
                if stat is not None:
                    cache[pid] = _Entry(stat, now + self._spread(pid), young=not first_pass)
                continue
            entry.young = False
            parent = entry.ppid
            reparented = parent != 0 and parent not in live
            due = now >= entry.recheck_at
            if not (due or reparented or pid in self._members):
                continue
            stat = read_stat(self.proc_root, pid)
            if stat is None:
                del cache[pid]
            elif stat.starttime_ticks != entry.start:
                cache[pid] = _Entry(stat, now + self._spread(pid), young=True)  # the pid was reused
            else:
                entry.update(stat)
                if due:
                    entry.forget_derived()
                    entry.recheck_at = now + self._spread(pid)

    def _spread(self, pid: int) -> float:
        # Deterministic spread over [refresh, 2*refresh) so that the processes seen in
        # the first pass are not all re-read together later.
        return self._refresh_s * (1.0 + (pid % 64) / 64.0)

    def _worker(self, name: str, matched: Mapping[int, str], children: Mapping[int, list[int]]) -> WorkerProcs:
        if not matched:
            return WorkerProcs(name, frozenset(), (), None)
        roots = sorted(pid for pid in matched if not self._has_ancestor_in(pid, matched))
        pids = set(roots)
        stack = list(roots)
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in pids:
                    pids.add(child)
                    stack.append(child)
        first = roots[0]
        # A systemd unit's cgroup is the unit itself, even when the process sits in a
        # delegated sub-cgroup; otherwise the root process's own cgroup.
        rel = matched[first] or self._cgroup_of(first)
        return WorkerProcs(name, frozenset(pids), tuple(roots), self._cgroup_dir(rel))

    def _has_ancestor_in(self, pid: int, matched: Mapping[int, str]) -> bool:
        seen = {pid}
        entry = self._cache.get(pid)
        while entry is not None:
            parent = entry.ppid
            if parent in matched:
                return True
            if parent in seen:  # a cycle only a racing or fake tree can show
                return False
            seen.add(parent)
            entry = self._cache.get(parent)
        return False

    def _cgroup_dir(self, rel: str | None) -> str | None:
        if not rel or rel == "/":
            return None  # the root cgroup is not the worker's own (and has no memory.events)
        return os.path.join(self.cgroup_root, rel.lstrip("/"))

    # -- per-process facts (cached) ---------------------------------------------

    def _read_cmdline(self, pid: int, entry: _Entry) -> frozenset[str]:
        data = read_proc_file(f"{self.proc_root}/{pid}/cmdline")
        cmdline = "" if data is None else data.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
        entry.cmd_hits = frozenset(name for name, rx in self._regexes.items() if cmdline and rx.search(cmdline))
        return entry.cmd_hits

    def _read_cgroup(self, pid: int, entry: _Entry) -> None:
        entry.cgroup_read = True
        entry.cgroup = None
        entry.unit_hits = {}
        data = read_proc_file(f"{self.proc_root}/{pid}/cgroup")
        if data is None:
            return
        v2: str | None = None
        systemd_v1: str | None = None
        for line in data.decode("utf-8", "replace").splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            # A zombie whose cgroup was removed shows "<path> (deleted)".
            path = path.removesuffix(" (deleted)")
            if hierarchy == "0" and controllers == "":
                v2 = path
            elif controllers == "name=systemd":
                systemd_v1 = path
        entry.cgroup = v2
        # On a cgroup v1-only host the unit still shows in the name=systemd hierarchy.
        unit_path = v2 if v2 is not None else systemd_v1
        if unit_path is None:
            return
        segments = unit_path.split("/")
        for name, unit in self._units.items():
            if unit in segments:
                unit_dir = "/".join(segments[: segments.index(unit) + 1])
                entry.unit_hits[name] = unit_dir if v2 is not None else ""

    def _cgroup_of(self, pid: int) -> str | None:
        entry = self._cache.get(pid)
        if entry is None:
            return None
        if not entry.cgroup_read:
            self._read_cgroup(pid, entry)
        return entry.cgroup

    def _pid_file_match(self, name: str, path: str) -> dict[int, str]:
        pid = self._pid_from_file(name, path)
        entry = self._cache.get(pid) if pid is not None else None
        if pid is None or entry is None or not entry.eligible:
            return {}
        return {pid: ""}

    def _pid_from_file(self, name: str, path: str) -> int | None:
        data = read_proc_file(path)
        if data is None:
            return None  # no pid file: the worker is not running, nothing to warn about
        token = data.split(maxsplit=1)[0] if data.strip() else b""
        try:
            pid = int(token)
        except ValueError:
            pid = 0
        if pid <= 0:
            self._warn_once(f"pidfile:{name}", "worker %s: pid file %s does not hold a pid", name, path)
            return None
        self._warned.discard(f"pidfile:{name}")
        return pid

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)
