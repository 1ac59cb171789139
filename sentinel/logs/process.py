"""Following the output of a command that follows a log (`journalctl -f`), in a thread.

The command runs in its own session (a Ctrl-C meant for Sentinel does not reach it),
its stdout is read with `poll` so that a stop request is seen within a poll, and it
is restarted with a growing delay when it exits. Its stderr goes to a temporary
file: a chatty command cannot block on a full pipe, and the text explains an exit.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO

from sentinel.logs.pipeline import LineSink, StopSignal

__all__ = ["ProcessFollower"]

_POLL_MS = 500
_STDERR_TAIL = 300  # characters of stderr quoted in a problem report
_STABLE_S = 30.0  # a run this long resets the restart delay


class ProcessFollower:
    """Runs `argv()` until `stop`, handing stdout bytes to `on_data`; see the module doc."""

    def __init__(
        self,
        key: str,
        argv: Callable[[], Sequence[str]],
        on_data: Callable[[bytes], None],
        sink: LineSink,
        stop: StopSignal,
        *,
        on_idle: Callable[[], None] = lambda: None,
        retry_min_s: float = 1.0,
        retry_max_s: float = 30.0,
    ) -> None:
        self._key = key
        self._argv = argv
        self._on_data = on_data
        self._sink = sink
        self._stop = stop
        self._on_idle = on_idle
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self.starts = 0
        """How many times the command was started (for tests and diagnostics)."""
        self.last_output = False
        """Whether the last run printed anything."""
        self.last_stderr = ""
        """The end of the last run's stderr (once it exited)."""

    def run(self) -> None:
        """The thread body: returns once `stop` is set."""
        delay = self._retry_min_s
        while not self._stop.is_set():
            argv = list(self._argv())
            started = time.monotonic()
            problem = self._run_once(argv)
            if self._stop.is_set():
                return
            if problem is not None:
                self._sink.problem(self._key, problem)
            if time.monotonic() - started > _STABLE_S:
                delay = self._retry_min_s
            self._stop.wait(delay)
            delay = min(delay * 2, self._retry_max_s)

    def _run_once(self, argv: list[str]) -> str | None:
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                return f"cannot run {argv[0]}: {exc.strerror or exc}"
            self.starts += 1
            self.last_output = False
            self.last_stderr = ""
            try:
                self._pump(proc)
            finally:
                rc = _reap(proc)
            if self._stop.is_set():
                return None
            text = self.last_stderr = _tail(err)
            return f"{argv[0]} exited with status {rc}" + (f": {text}" if text else "")

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._stop.fileno(), select.POLLIN)
        recovered = False
        # Non-blocking: poll also wakes for the stop pipe, and a read must never wait on the command.
        os.set_blocking(fd, False)
        while not self._stop.is_set():
            ready = poller.poll(_POLL_MS)
            if not ready:
                self._on_idle()
                continue
            if self._stop.is_set():
                return
            try:
                data = os.read(fd, 64 * 1024)
            except BlockingIOError:
                continue
            if not data:
                return  # EOF: the command exited or closed its output
            if not recovered:
                recovered = True
                self.last_output = True
                self._sink.problem(self._key, None)
            self._on_data(data)
            self._on_idle()


def _reap(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def _tail(err: IO[bytes]) -> str:
    try:
        err.seek(0, os.SEEK_END)
        size = err.tell()
        err.seek(max(0, size - 4 * _STDERR_TAIL))
        text = err.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " ".join(text.split())[-_STDERR_TAIL:]
