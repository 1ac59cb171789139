"""Leader election: etcd's own recipe (`concurrency.Election`), with fencing.

Each candidate puts `election/<lease hex>` = host id under its session lease (create if
absent, in one transaction); the key with the lowest create_revision leads. This is the
layout etcd's server-side election service and `etcdctl elect` use, so etcd's own tools
see the same leader. Candidates learn of changes through a mirror of the election
prefix (a few bytes per host).

A leader is deposed the moment its session stops being surely valid (see session.py),
without waiting for etcd to say so: `is_leader()` checks the local lease deadline. And
every write a leader makes carries `fence()`, a compare on its election key's
create_revision, so a deposed leader that has not noticed yet cannot write: its key is
gone with its lease, and the compare fails.
"""

from __future__ import annotations

import asyncio
import logging

from sentinel.fleet.etcd import Compare, EtcdClient, KeyValue, PutOp, RangeOp
from sentinel.fleet.session import Session
from sentinel.fleet.watch import Informer

__all__ = ["Election"]

log = logging.getLogger(__name__)


class Election:
    def __init__(self, client: EtcdClient, prefix: str, value: str, session: Session) -> None:
        self.client = client
        self.prefix = prefix
        self.value = value
        self.session = session
        self.informer = Informer(client, prefix)
        self.my_key: str | None = None
        self.my_rev = 0
        self._my_lease = 0

    async def campaign(self, lease: int) -> None:
        """Enter the election under `lease` (called by the session for each new lease)."""
        key = f"{self.prefix}{lease:x}"
        result = await self.client.txn(
            [Compare(key, "create", "=", 0)],
            [PutOp(key, self.value.encode(), lease)],
            [RangeOp(key)],
        )
        if result.succeeded:
            self.my_rev = result.revision
        else:
            existing = result.range(0).kvs
            self.my_rev = existing[0].create_revision if existing else result.revision
        self.my_key = key
        self._my_lease = lease
        log.debug("fleet: campaigning as %s (rev %d)", key, self.my_rev)

    def leader_kv(self) -> KeyValue | None:
        """The current leader's election key, as this host's mirror sees it."""
        kvs = [kv for kv in self.informer.items.values() if kv.create_revision > 0]
        return min(kvs, key=lambda kv: kv.create_revision) if kvs else None

    def leader_id(self) -> str | None:
        kv = self.leader_kv()
        return kv.value.decode() if kv is not None else None

    def is_leader(self) -> bool:
        """Leading now: our key is the oldest and our lease is surely alive."""
        if not self.session.valid() or self.session.lease_id != self._my_lease or self.my_key is None:
            return False
        kv = self.leader_kv()
        return kv is not None and kv.key == self.my_key and kv.create_revision == self.my_rev

    def fence(self) -> Compare:
        """Guard for a leader's writes: our election key still is the one we created."""
        assert self.my_key is not None
        return Compare(self.my_key, "create", "=", self.my_rev)

    async def wait_elected(self) -> None:
        while not self.is_leader():
            version = self.informer.version
            waiters = [
                asyncio.ensure_future(self.informer.wait_changed(version, 1.0)),
                asyncio.ensure_future(self.session.wait_changed(1.0)),
            ]
            _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()

    async def wait_deposed(self) -> str:
        """Return (with the reason) as soon as this host stops being the leader."""
        while True:
            if not self.session.valid():
                return "the session lease is no longer surely valid"
            if not self.is_leader():
                return f"another candidate leads ({self.leader_id()})"
            # Wake at the lease deadline at the latest: loss needs no message from etcd.
            left = self.session.deadline - self.session.margin - self.session.clock()
            version = self.informer.version
            waiters = [
                asyncio.ensure_future(self.informer.wait_changed(version, max(0.0, min(left, 1.0)))),
                asyncio.ensure_future(self.session.wait_changed(max(0.0, min(left, 1.0)))),
            ]
            _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()

    async def resign(self) -> None:
        if self.my_key is not None:
            await self.client.delete(self.my_key)
            self.my_key = None
