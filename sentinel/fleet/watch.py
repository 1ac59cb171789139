"""A local mirror of one etcd prefix, kept current by list + watch (an "informer").

The pattern is Kubernetes' reflector: read the prefix once (a range at revision R),
then watch from R+1 and apply every event in order. When the stream breaks, it resumes
from the last revision it applied, so no event is lost and none is applied twice. When
etcd has compacted that history away, it lists again. Readers look at `items` (a dict
of key -> KeyValue) and wait on `wait_changed` instead of polling etcd.

The revision to resume from advances only on events (their mod_revision) and on
progress notifications; never on the `created` reply, whose header revision can run
ahead of the events a catching-up watcher still has to receive.

A stream can also stall without breaking (a black-holed connection). `kick()` drops
the current stream so it reconnects; the session calls it when etcd becomes reachable
again after an outage.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from sentinel.fleet.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    KeyValue,
    WatchEvent,
    cancel_and_wait,
    reraise_if_cancelled,
)
from sentinel.runtime.timeouts import wait_for

__all__ = ["Informer"]

log = logging.getLogger(__name__)

OnChange = Callable[["Informer", list[WatchEvent]], None]


class Informer:
    """Mirror of every key under `prefix`; run `run()` as a task, read `items`."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        *,
        on_change: OnChange | None = None,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.items: dict[str, KeyValue] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        self.relists = 0
        self.reconnects = 0
        self.connected = False
        self._on_change = on_change
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._changed: asyncio.Future[None] | None = None
        self._stream_task: asyncio.Task[None] | None = None
        self._version = 0
        self._kicked = False

    @property
    def version(self) -> int:
        """Bumped on every change applied (for `wait_changed`)."""
        return self._version

    async def wait_changed(self, since_version: int, timeout: float) -> bool:
        """Wait until something changed after `since_version`; False on timeout."""
        if self._version != since_version:
            return True
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        try:
            await wait_for(asyncio.shield(self._changed), timeout)
        except asyncio.TimeoutError:
            return self._version != since_version
        return True

    def kick(self) -> None:
        """Drop the current stream so it reconnects (from the last revision applied)."""
        if self._stream_task is not None and not self._stream_task.done():
            self._kicked = True
            self._stream_task.cancel()

    async def run(self) -> None:
        """List, then watch forever; reconnect on errors. Cancel the task to stop."""
        delay = self._backoff_s
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                self._kicked = False
                self._stream_task = asyncio.ensure_future(self._stream())
                try:
                    await self._stream_task
                except asyncio.CancelledError:
                    reraise_if_cancelled()  # our own task is being stopped, not kicked
                    if not self._kicked:
                        raise
                    # kicked: reconnect at once from the last revision applied
                    self._kicked = False
                    self.reconnects += 1
                    self.connected = False
                    continue
                delay = self._backoff_s
            except EtcdCompacted as exc:
                log.info("watch on %s: history compacted at %d, listing again", self.prefix, exc.compact_revision)
                need_list = True
                self.relists += 1
            except EtcdError as exc:
                self.connected = False
                self.reconnects += 1
                log.debug("watch on %s broke (%s); resuming from revision %d", self.prefix, exc, self.revision + 1)
            except Exception:  # never a dead mirror: log the surprise and reconnect
                self.connected = False
                self.reconnects += 1
                log.exception(
                    "watch on %s failed unexpectedly; resuming from revision %d", self.prefix, self.revision + 1
                )
            except asyncio.CancelledError:
                if self._stream_task is not None:
                    self._stream_task.cancel()
                raise
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(self._max_backoff_s, delay * 2)

    async def _list(self) -> None:
        result = await self.client.range(self.prefix, prefix=True)
        old = self.items
        self.items = {kv.key: kv for kv in result.kvs}
        self.revision = result.revision
        events = [WatchEvent("PUT", kv) for kv in result.kvs if old.get(kv.key) != kv]
        events += [WatchEvent("DELETE", kv) for key, kv in old.items() if key not in self.items]
        self.synced.set()
        self._changed_now(events, force=True)

    async def _stream(self) -> None:
        async for response in self.client.watch_stream(
            self.prefix, prefix=True, start_revision=self.revision + 1, prev_kv=False
        ):
            self.connected = True
            if response.events:
                for event in response.events:
                    if event.type == "PUT":
                        self.items[event.kv.key] = event.kv
                    else:
                        self.items.pop(event.kv.key, None)
                    self.revision = max(self.revision, event.kv.mod_revision)
                self._changed_now(list(response.events))
            elif response.progress:
                self.revision = max(self.revision, response.revision)

    def _changed_now(self, events: list[WatchEvent], *, force: bool = False) -> None:
        if not events and not force:
            return
        self._version += 1
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        if self._on_change is not None:
            try:
                self._on_change(self, events)
            except Exception:  # a consumer's bug must not stop the mirror
                log.exception("informer callback for %s failed", self.prefix)

    async def stop(self, task: asyncio.Task[None]) -> None:
        await cancel_and_wait(task)
