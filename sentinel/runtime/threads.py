"""Small bounded pools of daemon threads for blocking work that must not wait behind other work.

asyncio's default executor is one pool for everything that calls `asyncio.to_thread`;
when a few calls in it hang (a query that never ends, a read from a dead NFS mount),
everything else queued there waits too: in issue 15 (F4) six stuck queries left
command-backend actions and reloads waiting forever. So each kind of blocking work
that must keep moving has its own `WorkerThreads`: the remediation journal, each worker
backend, configuration reloads, the notification outbox, rule evaluation.

The threads are daemon threads, started on demand up to `max_workers`, and they end
after `idle_exit_s` without work, so an idle pool holds no thread. A
`ThreadPoolExecutor` joins its threads at interpreter exit and in `shutdown(wait=True)`,
so one thread stuck in the kernel would keep a stopped Sentinel alive; here `shutdown`
never blocks for longer than its `timeout` and exit does not wait at all, so SIGTERM
ends the process within its stop budget whatever is stuck.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["WorkerThreads"]

T = TypeVar("T")

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class WorkerThreads(Executor):
    """A `concurrent.futures.Executor` of at most `max_workers` daemon threads (module doc)."""

    def __init__(self, name: str, max_workers: int = 1, *, idle_exit_s: float = 30.0) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.name = name
        self.max_workers = max_workers
        self.idle_exit_s = idle_exit_s
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue `fn(*args, **kwargs)`; calls run in submission order when `max_workers` is 1."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: cannot run new work after shutdown")
            self._queue.put((future, fn, args, kwargs))
            # `_idle` counts the threads waiting in get() right now (each takes one item in
            # turn): another thread only when more work waits than threads do.
            if self._queue.qsize() > self._idle and len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Await `fn(*args, **kwargs)` run on one of these threads."""
        call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self, call)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None) -> None:
        """Refuse new work; with `wait`, wait up to `timeout` seconds for the threads to finish."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join(timeout)

    @property
    def busy(self) -> int:
        """Threads running work now (for diagnostics)."""
        with self._lock:
            return len(self._threads) - self._idle

    def _work(self) -> None:
        # A thread is idle exactly while it waits in get(): counted in and out under the
        # lock, so submit() never trusts a thread that has left or is busy (it once did, and
        # a call could wait in the queue with no thread until the next call came).
        while True:
            with self._lock:
                self._idle += 1
            try:
                item = self._queue.get(timeout=self.idle_exit_s)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    # Under the lock, as submit() is: no work can slip in between the check and the exit.
                    if self._queue.empty():
                        self._threads.remove(threading.current_thread())
                        return
                continue
            with self._lock:
                self._idle -= 1
            if item is None:
                with self._lock:
                    if threading.current_thread() in self._threads:
                        self._threads.remove(threading.current_thread())
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs
