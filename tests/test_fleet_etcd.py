"""The etcd v3 gateway client and its watch mirror, against a real etcd: transactions,
leases, watch resumption after a cut (no event lost, none twice), relisting after a
compaction, endpoint failover, deadlines, TLS with a client certificate, and auth."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from sentinel.fleet.election import Election
from sentinel.fleet.etcd import (
    Compare,
    EtcdAuthError,
    EtcdClient,
    EtcdRequestError,
    EtcdUnavailable,
    PutOp,
    RangeOp,
    WatchEvent,
)
from sentinel.fleet.session import Session
from sentinel.fleet.watch import Informer
from tests.conftest import require_tool
from tests.etcd_cluster import EtcdCluster, free_port, running_cluster
from tests.fleet_helpers import wait_for
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


async def test_txn_compare_and_swap_reads_the_zero_fields_etcd_omits(etcd1: EtcdCluster, fleet_name: str) -> None:
    key = f"/{fleet_name}/k"
    async with EtcdClient(etcd1.endpoints) as c:
        assert await c.get(key) is None
        first = await c.txn([Compare(key, "create", "=", 0)], [PutOp(key, b"one")])
        assert first.succeeded
        again = await c.txn([Compare(key, "create", "=", 0)], [PutOp(key, b"two")], [RangeOp(key)])
        assert not again.succeeded  # "succeeded" is absent from the reply: read as False
        assert again.range(0).kvs[0].value == b"one"
        assert (await c.range(f"/{fleet_name}/none", prefix=True)).kvs == ()
        assert await c.delete(f"/{fleet_name}/", prefix=True) == 1


async def test_keys_under_a_lease_vanish_when_it_expires(etcd1: EtcdCluster, fleet_name: str) -> None:
    async with EtcdClient(etcd1.endpoints) as c:
        lease, ttl = await c.lease_grant(2)
        assert ttl == 2 and await c.lease_keepalive(lease) == 2
        await c.put(f"/{fleet_name}/leased", b"x", lease=lease)
        deadline = time.monotonic() + 10
        while await c.get(f"/{fleet_name}/leased") is not None:
            assert time.monotonic() < deadline, "the leased key outlived its lease"
            await asyncio.sleep(0.1)
        assert await c.lease_keepalive(lease) == 0  # expired: TTL 0, not an error


async def test_watch_resumes_after_a_cut_without_losing_or_repeating_events(
    etcd1: EtcdCluster, fleet_name: str
) -> None:
    prefix = f"/{fleet_name}/w/"
    port = int(etcd1.endpoints[0].rsplit(":", 1)[1])
    proxy = await TcpProxy("127.0.0.1", port).start()
    seen: list[WatchEvent] = []
    async with EtcdClient([proxy.url], request_timeout=1.0) as through, EtcdClient(etcd1.endpoints) as direct:
        informer = Informer(through, prefix, on_change=lambda _, events: seen.extend(events))
        task = asyncio.ensure_future(informer.run())
        try:
            await asyncio.wait_for(informer.synced.wait(), 10)
            for i in range(3):
                await direct.put(f"{prefix}{i}", b"before")
            await wait_for(lambda: len(informer.items) == 3, 10, "three keys mirrored")
            proxy.cut()
            for i in range(3, 6):  # written while the watcher is cut off
                await direct.put(f"{prefix}{i}", b"during")
            await direct.delete(f"{prefix}0")
            proxy.heal()
            await wait_for(lambda: set(informer.items) == {f"{prefix}{i}" for i in range(1, 6)}, 20, "catch-up")
            assert informer.reconnects >= 1 and informer.relists == 0
        finally:
            await informer.stop(task)
            await proxy.close()
    puts = [e.kv.key for e in seen if e.type == "PUT"]
    assert sorted(puts) == sorted(f"{prefix}{i}" for i in range(6))  # each once
    assert [e.kv.key for e in seen if e.type == "DELETE"] == [f"{prefix}0"]


async def test_watch_lists_again_when_its_history_was_compacted(etcd1: EtcdCluster, fleet_name: str) -> None:
    prefix = f"/{fleet_name}/c/"
    port = int(etcd1.endpoints[0].rsplit(":", 1)[1])
    proxy = await TcpProxy("127.0.0.1", port).start()
    async with EtcdClient([proxy.url], request_timeout=1.0) as through, EtcdClient(etcd1.endpoints) as direct:
        informer = Informer(through, prefix)
        task = asyncio.ensure_future(informer.run())
        try:
            await asyncio.wait_for(informer.synced.wait(), 10)
            await direct.put(f"{prefix}a", b"1")
            await wait_for(lambda: len(informer.items) == 1, 10, "first key")
            proxy.cut()
            await direct.put(f"{prefix}b", b"2")
            await direct.delete(f"{prefix}a")
            rev = await direct.put(f"/{fleet_name}/other", b"x")
            await direct.compact(rev)
            proxy.heal()
            await wait_for(lambda: set(informer.items) == {f"{prefix}b"}, 20, "state after relist")
            assert informer.relists == 1
        finally:
            await informer.stop(task)
            await proxy.close()


@pytest.mark.wallclock
async def test_calls_fail_over_to_a_live_member(etcd3: EtcdCluster, fleet_name: str) -> None:
    """A dead member first in the list costs a refused connect, then the next one answers."""
    leader = etcd3.leader_index()
    dead = next(i for i in range(3) if i != leader)
    etcd3.kill(dead)
    order = [etcd3.endpoints[dead], *(e for i, e in enumerate(etcd3.endpoints) if i != dead)]
    async with EtcdClient(order, request_timeout=3.0) as c:
        started = time.monotonic()
        await c.put(f"/{fleet_name}/x", b"1")
        assert (await c.get(f"/{fleet_name}/x")) is not None
        assert time.monotonic() - started < 3.0
        assert c.endpoints[c._endpoints.current] != etcd3.endpoints[dead]  # and it sticks to the live one


@pytest.mark.wallclock
async def test_an_unreachable_or_silent_endpoint_fails_within_the_deadline() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with EtcdClient([closed], request_timeout=0.5) as c:
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match="etcd unavailable for /v3/kv/range"):
            await c.get("/x")
        assert time.monotonic() - started < 1.5
    accepted: list[asyncio.StreamWriter] = []  # accepts, never answers; closed at the end
    server = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    silent = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with EtcdClient([silent], request_timeout=0.5) as c:
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable) as info:
                await c.txn([], [PutOp("/x", b"1")])
            assert info.value.maybe_applied  # a write that was sent: the caller must check
            assert time.monotonic() - started < 1.5
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_election_keys_are_the_ones_etcds_election_service_reads(etcd1: EtcdCluster, fleet_name: str) -> None:
    """Our campaign uses etcd's own layout: /v3/election/leader names our host."""
    import base64
    import json
    import urllib.request

    prefix = f"/sentinel/{fleet_name}/election/"
    async with EtcdClient(etcd1.endpoints) as c:
        session = Session(c, 5)
        task = asyncio.ensure_future(session.run())
        election = Election(c, prefix, "host-a", session)
        inf = asyncio.ensure_future(election.informer.run())
        try:
            assert await session.wait_valid(10)
            assert session.lease_id is not None
            await election.campaign(session.lease_id)
            await asyncio.wait_for(election.wait_elected(), 10)
            body = json.dumps({"name": base64.b64encode(prefix.rstrip("/").encode()).decode()}).encode()

            def leader() -> bytes:
                with urllib.request.urlopen(etcd1.endpoints[0] + "/v3/election/leader", body, timeout=5) as r:
                    return bytes(r.read())

            reply = await asyncio.to_thread(leader)
            kv = json.loads(reply)["kv"]
            assert base64.b64decode(kv["value"]) == b"host-a"
        finally:
            await election.informer.stop(inf)
            await session.close(task)


def _certs(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 (also a client one: etcd's own gateway
    dials its gRPC side with it), and a client certificate without a CommonName: etcd's
    JSON gateway refuses client certificates that carry one."""
    openssl = require_tool("openssl", "openssl")

    def run(*argv: str) -> None:
        subprocess.run([openssl, *argv], cwd=tmp, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=sentinel-test-ca")  # fmt: skip
    for name, subject, usage in (
        ("server", "/CN=127.0.0.1", "serverAuth,clientAuth"),
        ("client", "/O=sentinel", "clientAuth"),
    ):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        (tmp / f"{name}.cnf").write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.cnf")  # fmt: skip
    return {
        "ca": tmp / "ca.pem",
        "cert": tmp / "server.pem",
        "key": tmp / "server.key",
        "client_cert": tmp / "client.pem",
        "client_key": tmp / "client.key",
    }


async def test_tls_with_a_client_certificate_and_user_auth(tmp_path: Path, fleet_name: str) -> None:
    require_tool("etcd", "etcd-server")
    etcdctl = require_tool("etcdctl", "etcd-client")
    tls = _certs(tmp_path)
    with running_cluster(1, tls=tls) as cluster:
        ctl = [etcdctl, "--endpoints", cluster.endpoints[0], "--cacert", str(tls["ca"]),
               "--cert", str(tls["client_cert"]), "--key", str(tls["client_key"])]  # fmt: skip

        def ctl_run(*args: str) -> None:
            done = subprocess.run([*ctl, *args], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr

        ctl_run("user", "add", "root:rootpw", "--interactive=false")
        ctl_run("user", "add", "sentinel:s3cret", "--interactive=false")
        ctl_run("role", "add", "fleet")
        ctl_run("role", "grant-permission", "fleet", "--prefix=true", "readwrite", f"/sentinel/{fleet_name}/")
        ctl_run("user", "grant-role", "sentinel", "fleet")
        ctl_run("auth", "enable")
        kwargs = {"ca_file": tls["ca"], "cert_file": tls["client_cert"], "key_file": tls["client_key"]}
        async with EtcdClient(cluster.endpoints, user="sentinel", password="s3cret", **kwargs) as c:  # type: ignore[arg-type]
            key = f"/sentinel/{fleet_name}/hosts/a"
            lease, _ = await c.lease_grant(5)
            await c.put(key, b"hello", lease=lease)
            assert (await c.get(key)) is not None
            with pytest.raises(EtcdRequestError, match="permission denied"):
                await c.put("/elsewhere", b"x")
            c._token = "expired-or-forged"  # an invalid token is renewed once, transparently
            assert (await c.get(key)) is not None
        async with EtcdClient(cluster.endpoints, user="sentinel", password="wrong", **kwargs) as c:  # type: ignore[arg-type]
            with pytest.raises(EtcdAuthError, match="authentication failed"):
                await c.get(f"/sentinel/{fleet_name}/x")
        async with EtcdClient(cluster.endpoints, **{"ca_file": tls["ca"]}) as c:  # type: ignore[arg-type]
            with pytest.raises(EtcdUnavailable):  # no client certificate: the handshake fails
                await c.get("/x", timeout=2)
