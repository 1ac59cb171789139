"""Commands run for an action, tracked on disk, so that they never overlap the next action.

A command run for a worker (a command backend's verb, an `exec` action) runs in its own
session, never through a shell, so that a timeout can kill everything it spawned. That
also means it survives a `kill -9` of Sentinel. While it runs, a record in
`<state_dir>/running/<worker>.<purpose>.json` names its process group, the start time
of its leader, the boot and its deadline; the record goes when the command ends.

A restarted Sentinel calls `settle_leftovers` before it re-verifies a worker: a
recorded command still running (same boot, same start time, so not a reused pid) is
waited for until its deadline, then its whole group is killed, so verification sees
the worker after the command, never in the middle of it, and no second action starts
on top of it (issue 15, C4). A record of another boot, or of a group that is gone, is
simply removed.

Output goes to a temporary file rather than a pipe, so a command that leaves a daemon
behind holding its stdout cannot hang the verb; its tail is returned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sentinel.remediation.backend import BackendError
from sentinel.remediation.backends.children import process_identity, signal_group, wait_group
from sentinel.runtime.clock import Clocks, SystemClocks
from sentinel.runtime.threads import WorkerThreads
from sentinel.runtime.timeouts import wait_for
from sentinel.state.files import atomic_write

__all__ = ["OUTPUT_TAIL", "Leftover", "has_leftovers", "quote_output", "record_path", "run_tracked", "settle_leftovers"]

log = logging.getLogger(__name__)

OUTPUT_TAIL = 2000  # bytes of a command's output returned
KILL_WAIT_S = 5.0
RUNNING_DIR = "running"


def record_path(state_dir: Path, worker: str, purpose: str) -> Path:
    """Where a running command of `worker` for `purpose` (a verb, `exec`) is recorded."""
    return state_dir / RUNNING_DIR / f"{worker}.{purpose}.json"


async def run_tracked(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    what: str,
    record: Path | None,
    threads: WorkerThreads,
    cwd: str | None = None,
    clocks: Clocks | None = None,
) -> tuple[int, str]:
    """Run `argv` in its own session; (exit status, output tail). Timeout or cancel kills its group.

    Raises BackendError when it cannot start or runs past `timeout` (`what` names it).
    """
    clocks = clocks or SystemClocks()
    out = await threads.run(tempfile.TemporaryFile)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out.fileno(),
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,  # its own group: a timeout kills what it spawned too
            )
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot run {what} {argv[0]!r}: {exc}") from exc
        if record is not None:
            await threads.run(_write_record, record, proc.pid, what, timeout, clocks)
        try:
            code = await wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            await _kill(proc, what)
            output = await threads.run(_tail, out)
            raise BackendError(
                f"{what} did not finish within {timeout:g}s; killed its process group{quote_output(output)}"
            ) from None
        except asyncio.CancelledError:
            # The caller gave up: do not leave the command acting on the worker behind its back.
            await _kill(proc, what)
            raise
        finally:
            if record is not None:
                await asyncio.shield(threads.run(_remove, record))
        return code, await threads.run(_tail, out)
    finally:
        out.close()


def quote_output(output: str) -> str:
    return f"; output: {output}" if output else ""


@dataclass(frozen=True)
class Leftover:
    """A command an earlier Sentinel started and what became of it."""

    path: Path
    what: str
    pid: int
    outcome: str  # "finished", "killed" (outlived its deadline), "survived SIGKILL"

    def describe(self) -> str:
        return f"{self.what} (pid {self.pid}) left running by the previous Sentinel: {self.outcome}"


async def settle_leftovers(
    state_dir: Path, worker: str, threads: WorkerThreads, clocks: Clocks | None = None
) -> list[Leftover]:
    """Wait for (or, past their deadline, kill) the commands of `worker` an earlier Sentinel left running."""
    clocks = clocks or SystemClocks()
    found = await threads.run(_records, state_dir, worker)
    settled = []
    for path, rec in found:
        pid, what = rec.pid, rec.what
        alive = rec.boot == clocks.boot_id() and await threads.run(process_identity, pid) == rec.identity
        if not alive:
            await threads.run(_remove, path)
            continue
        left = rec.deadline_steady - clocks.steady()
        log.warning(
            "worker %s: %s (pid %d) of the previous Sentinel still runs; waiting up to %.0fs for it before "
            "verifying the worker",
            worker,
            what,
            pid,
            max(0.0, left),
        )
        if await wait_group(pid, max(0.0, left)):
            outcome = "finished"
        else:
            signal_group(pid, signal.SIGKILL)
            outcome = "killed at its deadline" if await wait_group(pid, KILL_WAIT_S) else "survived SIGKILL"
            log.error("worker %s: %s (pid %d) outlived its deadline: %s", worker, what, pid, outcome)
        await threads.run(_remove, path)
        settled.append(Leftover(path, what, pid, outcome))
    return settled


@dataclass(frozen=True)
class _Record:
    pid: int
    what: str
    identity: tuple[int, int] | None
    boot: str
    deadline_steady: float

    @classmethod
    def parse(cls, data: object) -> _Record | None:
        if not isinstance(data, dict):
            return None
        pid, session, started = data.get("pid"), data.get("session"), data.get("started")
        deadline, boot = data.get("deadline_steady"), data.get("boot")
        if not isinstance(pid, int) or pid <= 0 or not isinstance(deadline, (int, float)) or not isinstance(boot, str):
            return None
        identity = (session, started) if isinstance(session, int) and isinstance(started, int) else None
        return cls(pid, str(data.get("what", "a command")), identity, boot, float(deadline))


def _write_record(path: Path, pid: int, what: str, timeout: float, clocks: Clocks) -> None:
    identity = process_identity(pid)
    record = {
        "pid": pid,
        "what": what,
        "session": identity[0] if identity else None,
        "started": identity[1] if identity else None,
        "boot": clocks.boot_id(),
        "deadline_steady": clocks.steady() + timeout,
        "deadline_wall": clocks.wall() + timeout,
    }
    try:
        atomic_write(path, (json.dumps(record) + "\n").encode(), 0o600)
    except OSError as exc:
        log.warning("cannot record running %s in %s: %s", what, path, exc)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _records(state_dir: Path, worker: str) -> list[tuple[Path, _Record]]:
    directory = state_dir / RUNNING_DIR
    out = []
    for path in sorted(directory.glob(f"{glob_escape(worker)}.*.json")):
        try:
            record = _Record.parse(json.loads(path.read_text()))
        except (OSError, ValueError):
            record = None
        if record is None:
            _remove(path)  # unreadable: nothing can be waited for
            continue
        out.append((path, record))
    return out


def has_leftovers(state_dir: Path, worker: str) -> bool:
    """Whether a command of `worker` was recorded as running (blocking: call it from a thread)."""
    return any((state_dir / RUNNING_DIR).glob(f"{glob_escape(worker)}.*.json"))


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


async def _kill(proc: asyncio.subprocess.Process, what: str) -> None:
    signal_group(proc.pid, signal.SIGKILL)
    try:
        await wait_for(proc.wait(), KILL_WAIT_S)
    except asyncio.TimeoutError:
        log.error("%s: pid %d survived SIGKILL for %gs", what, proc.pid, KILL_WAIT_S)


def _tail(f: IO[bytes]) -> str:
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - OUTPUT_TAIL))
    return f.read().decode("utf-8", errors="replace").strip()
