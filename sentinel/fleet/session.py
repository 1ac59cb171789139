"""This host's lease on etcd: granted, kept alive, and trusted only while surely valid.

Everything this host holds in etcd (its status, its election key, its disruption slots,
a group lock) is written under one lease, so a host that dies frees all of it within
the lease TTL, as etcd's `concurrency.Session` does.

The safety rule is local and needs no answer from etcd: after a keep-alive sent at time
`t` is answered with TTL `T`, the server cannot expire the lease before `t + T`. Past
that deadline (less a small margin for clock rate) this host must assume the lease is
gone: `valid()` turns false on its own, a leader stops leading, and slots are reported
lost. When etcd answers again, a lease that outlived the deadline is revoked rather
than reused, so nothing held under it can linger after we declared it lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from sentinel.fleet.etcd import EtcdClient, EtcdError, cancel_and_wait
from sentinel.runtime.timeouts import wait_for

__all__ = ["Session", "SessionState"]

log = logging.getLogger(__name__)

SessionState = Literal["connecting", "up", "unreachable"]
OnLease = Callable[[int], Awaitable[None]]
OnLost = Callable[[int, str], None]


class Session:
    """Run `run()` as a task; read `valid()`, `lease_id`, `state`."""

    def __init__(
        self,
        client: EtcdClient,
        ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        retry_s: float = 0.5,
    ) -> None:
        self.client = client
        self.ttl = max(2, round(ttl))
        self.clock = clock
        self.retry_s = retry_s
        self.lease_id: int | None = None
        self.deadline = 0.0
        self.state: SessionState = "connecting"
        self.unreachable_since: float | None = None
        self.last_error = ""
        self.generation = 0
        self.leases_lost = 0
        self._on_lease: list[OnLease] = []
        self._on_lost: list[OnLost] = []
        self._changed = asyncio.Event()
        self._stale: list[int] = []

    @property
    def margin(self) -> float:
        return 0.1 + 0.05 * self.ttl

    def valid(self) -> bool:
        """True while the lease surely still exists on the server."""
        return self.lease_id is not None and self.clock() < self.deadline - self.margin

    def on_lease(self, callback: OnLease) -> None:
        """Called (awaited) with each new lease, before it counts as up."""
        self._on_lease.append(callback)

    def on_lost(self, callback: OnLost) -> None:
        """Called with (lease id, reason) the moment a lease must be assumed gone."""
        self._on_lost.append(callback)

    async def wait_changed(self, timeout: float) -> None:
        """Wait for the next new lease, loss or reachability change (or the timeout)."""
        event = self._changed
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(event.wait(), timeout)

    def _notify(self) -> None:
        # Wake everyone waiting now; later waiters wait for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_valid(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.valid():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self.wait_changed(min(left, 0.5))
        return True

    def _lose(self, reason: str) -> None:
        lease = self.lease_id
        if lease is None:
            return
        self.lease_id = None
        self.deadline = 0.0
        self.leases_lost += 1
        self._stale.append(lease)
        log.warning("fleet: lease %x lost (%s)", lease, reason)
        for cb in self._on_lost:
            try:
                cb(lease, reason)
            except Exception:
                log.exception("fleet: lease-lost callback failed")
        self._notify()

    def _unreachable(self, exc: Exception) -> None:
        if self.state != "unreachable":
            log.warning("fleet: etcd unreachable: %s", exc)
            self.unreachable_since = time.time()
            self.state = "unreachable"
            self._notify()
        self.last_error = str(exc)

    async def run(self) -> None:
        """Grant, keep alive, detect loss, grant again. Cancel to stop (see `close`)."""
        while True:
            now = self.clock()
            if self.lease_id is not None and now >= self.deadline - self.margin:
                self._lose("no keep-alive answered before the lease deadline")
            if self.lease_id is None:
                await self._grant()
                if self.lease_id is None:
                    await asyncio.sleep(self.retry_s)
                continue
            await self._sleep_until_next_keepalive()
            if self.lease_id is not None and self.clock() < self.deadline - self.margin:
                await self._keepalive()

    async def _sleep_until_next_keepalive(self) -> None:
        interval = self.ttl / 3 if self.state == "up" else self.retry_s
        wake = min(self.clock() + interval, self.deadline - self.margin)
        await asyncio.sleep(max(0.0, wake - self.clock()))

    async def _grant(self) -> None:
        try:
            await self._revoke_stale()
            sent = self.clock()
            lease, ttl = await self.client.lease_grant(self.ttl)
        except EtcdError as exc:
            self._unreachable(exc)
            return
        self.lease_id = lease
        self.deadline = sent + ttl
        try:
            for cb in self._on_lease:
                await cb(lease)
        except EtcdError as exc:
            # Could not set up what lives under the lease: give it back and retry.
            self._unreachable(exc)
            self.lease_id = None
            self._stale.append(lease)
            return
        self.generation += 1
        if self.state != "up":
            log.info("fleet: connected to etcd with lease %x (ttl %ds)", lease, ttl)
        self.state = "up"
        self.unreachable_since = None
        self._notify()

    async def _keepalive(self) -> None:
        lease = self.lease_id
        assert lease is not None
        sent = self.clock()
        try:
            ttl = await self.client.lease_keepalive(lease, timeout=min(self.client.request_timeout, self.ttl / 3))
        except EtcdError as exc:
            self._unreachable(exc)
            return
        if lease != self.lease_id:
            return
        if self.clock() >= self.deadline - self.margin:
            # We already stopped trusting it (a leader deposed itself, slots were reported
            # lost): once declared gone it stays gone, whatever the late answer says.
            self._lose("the keep-alive answered after the lease deadline")
            return
        if ttl <= 0:
            self._lose("etcd says the lease expired")
            return
        self.deadline = sent + ttl
        if self.state != "up":
            log.info("fleet: etcd reachable again; lease %x still valid", lease)
            self.state = "up"
            self.unreachable_since = None
            self._notify()

    async def _revoke_stale(self) -> None:
        """Leases we declared lost may still exist on the server: end them for sure."""
        while self._stale:
            await self.client.lease_revoke(self._stale[0])
            self._stale.pop(0)

    async def close(self, task: asyncio.Task[None] | None = None, *, timeout: float | None = None) -> None:
        """Stop keeping alive and revoke the lease (so peers see this host leave at once)."""
        if task is not None:
            await cancel_and_wait(task)
        lease, self.lease_id = self.lease_id, None
        if lease is not None:
            with contextlib.suppress(EtcdError):
                await self.client.lease_revoke(lease, timeout=timeout or self.client.request_timeout)
