"""Helpers shared by the backends that run child processes: environment, process groups, exits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "SERVICE_MANAGER_VARIABLES",
    "child_environ",
    "describe_exit",
    "group_alive",
    "process_identity",
    "signal_group",
    "wait_group",
]

# These describe Sentinel's own systemd service. A child that inherited NOTIFY_SOCKET
# could report READY/WATCHDOG on Sentinel's behalf; LISTEN_* would make it think it
# owns Sentinel's sockets.
SERVICE_MANAGER_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)

_POLL_S = 0.05


def child_environ(*layers: Mapping[str, str]) -> dict[str, str]:
    """os.environ without Sentinel's service-manager variables, then each layer over the last."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_MANAGER_VARIABLES}
    for layer in layers:
        env.update(layer)
    return env


def describe_exit(returncode: int) -> str:
    """`exited with status 3` or `killed by SIGKILL`, from an asyncio/subprocess return code."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group `pgid`; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    """Whether any process is left in the group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Only someone else's processes carry that id now: none of ours are left.
        return False
    return True


async def wait_group(pgid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the group to be empty; True when it is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # No event tells when the last member of a group exits (only the leader is our
    # child), so poll; a stop is rare and the interval is short.
    while group_alive(pgid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True


def process_identity(pid: int, proc_root: Path = Path("/proc")) -> tuple[int, int] | None:
    """(session id, start time in clock ticks) of `pid`, from /proc; None when it is gone.

    The start time tells a process from a later one that reused its pid.
    """
    try:
        data = (proc_root / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[3]), int(fields[19])
    except (IndexError, ValueError):
        return None
