"""A small, typed asyncio client for etcd's v3 JSON gateway (`/v3/...`), over aiohttp.

Why hand-written: docs/fleet.md records the comparison. In short, every asyncio etcd v3
client on PyPI that we installed and ran against Debian's etcd 3.4.23 lacked something
the fleet layer needs for safety — TLS (aetcd, etcd-client-py), several endpoints with
failover (aetcd, async-etcd3gw), the lease id from a grant or a put under a lease inside
a transaction (etcd-client-py), an election whose lease is kept alive (etcd3aio), or
Python 3.10 (etcd3aio) — and the gRPC ones pull grpcio into a daemon that already
speaks HTTP through aiohttp. The gateway is etcd's documented, stable (`/v3/` since
3.4) JSON mapping of the same gRPC API, so this module is a thin transport: the
recipes (sessions, elections, the budget semaphore) live in their own modules.

Rules every call follows:
- one deadline per call (`timeout`, default the client's `request_timeout`); nothing
  blocks the event loop;
- endpoints are tried in turn, starting with the last one that answered. A request that
  never reached a server (connection refused, connect timeout) moves on to the next
  endpoint at once. A request that may have reached a server and then failed (a read
  timeout, a dropped connection) is retried only when it is idempotent (reads, lease
  keep-alive); for writes it raises `EtcdUnavailable(maybe_applied=True)` and the caller,
  whose writes are designed to be checked afterwards (unique keys, compare-and-swap),
  decides;
- with a user, a token from `/v3/auth/authenticate` goes in the `Authorization` header
  and is renewed once when etcd says it is invalid or expired.

The gateway encodes bytes as base64 and 64-bit integers as strings, and omits fields at
their zero value (`"succeeded"` is absent on a failed transaction, `"kvs"` on an empty
range); the decoders here put the zeros back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

__all__ = [
    "Compare",
    "DeleteOp",
    "EtcdAuthError",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdRequestError",
    "EtcdUnavailable",
    "KeyValue",
    "PutOp",
    "RangeOp",
    "RangeResult",
    "TxnResult",
    "WatchEvent",
    "WatchResponse",
    "cancel_and_wait",
    "prefix_end",
    "reraise_if_cancelled",
]

log = logging.getLogger(__name__)

# gRPC status codes etcd returns through the gateway.
_UNAUTHENTICATED = 16
_INVALID_TOKEN_MESSAGES = ("invalid auth token", "user name is empty", "authentication failed")


class EtcdError(Exception):
    """Anything that went wrong talking to etcd."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time. `maybe_applied`: a write may have been applied anyway."""

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class EtcdRequestError(EtcdError):
    """etcd answered with an error (bad request, no leader, lease not found...)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdAuthError(EtcdRequestError):
    """The user or password was refused."""


class EtcdCompacted(EtcdError):
    """A watch asked for history that etcd has compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


def reraise_if_cancelled() -> None:
    """Re-raise a cancellation that a library turned into a timeout.

    aiohttp's timer cancels the task and converts the CancelledError into a
    TimeoutError; when our own task was cancelled at the same moment, that conversion
    swallows the cancellation. On Python 3.11+ the task still knows (`cancelling()`)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Future[Any], step_s: float = 1.0) -> None:
    """Cancel a task and wait until it is really done, cancelling again if a cancel was
    swallowed on the way (see `reraise_if_cancelled`)."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=step_s)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task ended with %r while being cancelled", task.exception())


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes | str) -> bytes:
    """The range end that selects every key starting with `prefix` (etcd's `WithPrefix`)."""
    raw = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\x00"


def _key_range(key: str, prefix: bool) -> dict[str, Any]:
    """The gateway's `key` (and `range_end` for every key under `key` as a prefix)."""
    body: dict[str, Any] = {"key": _b64(key)}
    if prefix:
        body["range_end"] = _b64(prefix_end(key))
    return body


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, kv: Mapping[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(kv.get("key")).decode(),
            value=_unb64(kv.get("value")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
            lease=int(kv.get("lease", 0)),
        )

    def json(self) -> Any:
        """The value decoded as JSON (None when it is not JSON)."""
        try:
            return json.loads(self.value)
        except ValueError:
            return None


@dataclass(frozen=True)
class RangeResult:
    revision: int
    kvs: tuple[KeyValue, ...]
    count: int

    def get(self, key: str) -> KeyValue | None:
        return next((kv for kv in self.kvs if kv.key == key), None)


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: tuple[Mapping[str, Any], ...]

    def range(self, index: int) -> RangeResult:
        """The i-th response of the branch that ran, as a range result."""
        body = self.responses[index].get("response_range", {})
        kvs = tuple(KeyValue.from_json(kv) for kv in body.get("kvs", []))
        return RangeResult(self.revision, kvs, int(body.get("count", 0)))


Target = Literal["version", "create", "mod", "value", "lease"]
Op = Literal["=", "!=", "<", ">"]
_RESULT = {"=": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
_TARGET = {"version": "VERSION", "create": "CREATE", "mod": "MOD", "value": "VALUE", "lease": "LEASE"}
_FIELD = {"version": "version", "create": "create_revision", "mod": "mod_revision", "value": "value", "lease": "lease"}


@dataclass(frozen=True)
class Compare:
    """One transaction guard, e.g. `Compare(key, "create", "=", 0)`: the key does not exist.

    A missing key compares as zero for version/create/mod, as etcd defines it. With
    `range_end`, every key of the range must satisfy it (an empty range compares as one
    missing key): `Compare(k, "version", "=", 0, range_end=e)` says no key in [k, e)."""

    key: str
    target: Target
    op: Op
    operand: int | bytes
    range_end: bytes | None = None  # compare every key in [key, range_end) (etcd 3.3+)

    def to_json(self) -> dict[str, Any]:
        operand: Any = _b64(self.operand) if isinstance(self.operand, bytes) else str(self.operand)
        body = {
            "key": _b64(self.key),
            "target": _TARGET[self.target],
            "result": _RESULT[self.op],
            _FIELD[self.target]: operand,
        }
        if self.range_end is not None:
            body["range_end"] = _b64(self.range_end)
        return body


@dataclass(frozen=True)
class PutOp:
    key: str
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        return {"request_put": body}


@dataclass(frozen=True)
class DeleteOp:
    key: str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_delete_range": _key_range(self.key, self.prefix)}


@dataclass(frozen=True)
class RangeOp:
    key: str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"request_range": _key_range(self.key, self.prefix)}


TxnOp = PutOp | DeleteOp | RangeOp


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None = None


@dataclass(frozen=True)
class WatchResponse:
    revision: int
    events: tuple[WatchEvent, ...] = ()
    created: bool = False
    progress: bool = False


@dataclass
class _Endpoints:
    urls: tuple[str, ...]
    current: int = 0

    def order(self) -> list[str]:
        """Every endpoint once, starting with the one that answered last."""
        n = len(self.urls)
        return [self.urls[(self.current + i) % n] for i in range(n)]

    def good(self, url: str) -> None:
        self.current = self.urls.index(url)

    def bad(self, url: str) -> None:
        """Start with the next endpoint from now on (this one just failed us)."""
        if self.urls[self.current] == url:
            self.current = (self.current + 1) % len(self.urls)


@dataclass
class ClientStats:
    """Counters for the load benchmark and the fleet series."""

    requests: int = 0
    failures: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    by_path: dict[str, int] = field(default_factory=dict)


def _ssl_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


class EtcdClient:
    """One connection pool to an etcd cluster. Create and close it on the event loop."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        request_timeout: float = 2.0,
        user: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._endpoints = _Endpoints(tuple(u.rstrip("/") for u in endpoints))
        self.request_timeout = request_timeout
        self._user = user
        self._password = password
        self._ssl: ssl.SSLContext | None = None
        if any(u.startswith("https://") for u in endpoints):
            self._ssl = _ssl_context(ca_file, cert_file, key_file)
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self.stats = ClientStats()

    # -- lifecycle ------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False, limit=0)
            self._session = aiohttp.ClientSession(connector=connector, json_serialize=json.dumps)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._endpoints.urls

    # -- transport ------------------------------------------------------------------------

    async def _authenticate(self, timeout: float) -> None:
        """Get a token for the configured user (once, shared by concurrent callers)."""
        token_before = self._token
        async with self._auth_lock:
            if self._token != token_before and self._token is not None:
                return
            body = {"name": self._user, "password": self._password}
            reply = await self._post("/v3/auth/authenticate", body, timeout=timeout, idempotent=True, auth=False)
            token = reply.get("token")
            if not token:
                raise EtcdAuthError("etcd returned no auth token")
            self._token = str(token)

    async def request(
        self, path: str, body: Mapping[str, Any], *, timeout: float | None = None, idempotent: bool = False
    ) -> dict[str, Any]:
        """POST one gateway call; the JSON reply. Renews the auth token once if needed."""
        deadline_s = self.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + deadline_s
        if self._user is not None and self._token is None:
            await self._authenticate(deadline_s)
        try:
            return await self._post(path, body, timeout=max(0.05, deadline - time.monotonic()), idempotent=idempotent)
        except EtcdRequestError as exc:
            if self._user is None or not _is_token_error(exc):
                raise
            self._token = None
            await self._authenticate(max(0.05, deadline - time.monotonic()))
            return await self._post(path, body, timeout=max(0.05, deadline - time.monotonic()), idempotent=idempotent)

    async def _post(
        self, path: str, body: Mapping[str, Any], *, timeout: float, idempotent: bool, auth: bool = True
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if auth and self._token is not None:
            headers["Authorization"] = self._token
        errors: list[str] = []
        maybe_applied = False
        order = self._endpoints.order()
        for attempt, url in enumerate(order):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # A dead member should cost a fraction of the deadline, not all of it.
            connect = max(0.05, min(remaining, timeout / max(1, len(order) - attempt), 1.0))
            self.stats.requests += 1
            self.stats.by_path[path] = self.stats.by_path.get(path, 0) + 1
            self.stats.bytes_sent += len(payload)
            try:
                async with self._http().post(
                    url + path,
                    data=payload,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=remaining, sock_connect=connect),
                ) as resp:
                    raw = await resp.read()
                    self.stats.bytes_received += len(raw)
                    reply = _decode(raw, url + path)
                    if resp.status >= 400 or ("error" in reply and "header" not in reply):
                        self.stats.failures += 1
                        err = _request_error(reply, resp.status)
                        if _retry_elsewhere(err):
                            self._endpoints.bad(url)
                            errors.append(f"{url}: {err}")
                            if not idempotent and _maybe_applied(err):
                                maybe_applied = True
                                break
                            continue
                        raise err
                    self._endpoints.good(url)
                    return reply
            except (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError) as exc:
                reraise_if_cancelled()
                # ClientConnectorError: nothing was sent. ServerTimeoutError covers the
                # connect timeout (nothing sent) and the read timeout (maybe applied).
                self.stats.failures += 1
                self._endpoints.bad(url)
                sent = isinstance(exc, aiohttp.ServerTimeoutError) and "onnect" not in str(exc)
                if sent and not idempotent:
                    maybe_applied = True
                    errors.append(f"{url}: {type(exc).__name__}: {exc}")
                    break
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                reraise_if_cancelled()
                self.stats.failures += 1
                self._endpoints.bad(url)
                errors.append(f"{url}: {type(exc).__name__}: {exc or 'timed out'}")
                if not idempotent:
                    maybe_applied = True
                    break
        detail = "; ".join(errors) or f"deadline of {timeout:.2f}s passed"
        raise EtcdUnavailable(f"etcd unavailable for {path}: {detail}", maybe_applied=maybe_applied)

    # -- KV -------------------------------------------------------------------------------

    async def range(
        self,
        key: str,
        *,
        prefix: bool = False,
        revision: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        limit: int = 0,
        timeout: float | None = None,
    ) -> RangeResult:
        body = _key_range(key, prefix)
        if revision:
            body["revision"] = str(revision)
        if keys_only:
            body["keys_only"] = True
        if count_only:
            body["count_only"] = True
        if limit:
            body["limit"] = str(limit)
        reply = await self.request("/v3/kv/range", body, timeout=timeout, idempotent=True)
        kvs = tuple(KeyValue.from_json(kv) for kv in reply.get("kvs", []))
        return RangeResult(_revision(reply), kvs, int(reply.get("count", 0)))

    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None:
        result = await self.range(key, timeout=timeout)
        return result.kvs[0] if result.kvs else None

    async def put(self, key: str, value: bytes, *, lease: int = 0, timeout: float | None = None) -> int:
        """Store a value; the new revision. Not retried on an uncertain failure."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _revision(await self.request("/v3/kv/put", body, timeout=timeout))

    async def delete(self, key: str, *, prefix: bool = False, timeout: float | None = None) -> int:
        """Delete a key (or a prefix); how many keys went. Deleting is idempotent."""
        body = _key_range(key, prefix)
        reply = await self.request("/v3/kv/deleterange", body, timeout=timeout, idempotent=True)
        return int(reply.get("deleted", 0))

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        """An atomic compare-and-swap. Not retried on an uncertain failure."""
        body = {
            "compare": [c.to_json() for c in compare],
            "success": [op.to_json() for op in success],
            "failure": [op.to_json() for op in failure],
        }
        reply = await self.request("/v3/kv/txn", body, timeout=timeout)
        return TxnResult(bool(reply.get("succeeded", False)), _revision(reply), tuple(reply.get("responses", [])))

    async def compact(self, revision: int, *, timeout: float | None = None) -> None:
        await self.request("/v3/kv/compaction", {"revision": str(revision), "physical": True}, timeout=timeout)

    # -- leases ---------------------------------------------------------------------------

    async def lease_grant(self, ttl: int, *, timeout: float | None = None) -> tuple[int, int]:
        """A new lease; (id, granted TTL in seconds)."""
        reply = await self.request("/v3/lease/grant", {"TTL": str(ttl), "ID": "0"}, timeout=timeout)
        if reply.get("error"):
            raise EtcdRequestError(f"lease grant refused: {reply['error']}")
        return int(reply["ID"]), int(reply.get("TTL", ttl))

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Refresh a lease; its TTL now, 0 when it has already expired."""
        reply = await self.request("/v3/lease/keepalive", {"ID": str(lease_id)}, timeout=timeout, idempotent=True)
        result = reply.get("result", reply)
        return int(result.get("TTL", 0))

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        """Revoke a lease and delete its keys; an unknown lease is not an error."""
        try:
            await self.request("/v3/lease/revoke", {"ID": str(lease_id)}, timeout=timeout, idempotent=True)
        except EtcdRequestError as exc:
            if "not found" not in str(exc):
                raise

    async def lease_ttl(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Seconds left on a lease; -1 when it does not exist."""
        reply = await self.request("/v3/lease/timetolive", {"ID": str(lease_id)}, timeout=timeout, idempotent=True)
        return int(reply.get("TTL", -1))

    # -- maintenance ----------------------------------------------------------------------

    async def status(self, endpoint: str, *, timeout: float | None = None) -> dict[str, Any]:
        """`/v3/maintenance/status` of one member (not failed over: it is about that member)."""
        t = self.request_timeout if timeout is None else timeout
        try:
            async with self._http().post(
                endpoint.rstrip("/") + "/v3/maintenance/status",
                data=b"{}",
                headers={"Authorization": self._token} if self._token else {},
                timeout=aiohttp.ClientTimeout(total=t),
            ) as resp:
                return _decode(await resp.read(), endpoint)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            reraise_if_cancelled()
            raise EtcdUnavailable(f"{endpoint}: {type(exc).__name__}: {exc}") from exc

    # -- watch ----------------------------------------------------------------------------

    async def watch_stream(
        self,
        key: str,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        prev_kv: bool = False,
        connect_timeout: float | None = None,
    ) -> AsyncIterator[WatchResponse]:
        """One watch stream on one endpoint; ends (raises) when the stream breaks.

        `Watcher` in watch.py reconnects from the last revision seen; use that."""
        create = {**_key_range(key, prefix), "progress_notify": True}
        if start_revision:
            create["start_revision"] = str(start_revision)
        if prev_kv:
            create["prev_kv"] = True
        if self._user is not None and self._token is None:
            await self._authenticate(self.request_timeout)
        payload = json.dumps({"create_request": create}).encode()
        t = self.request_timeout if connect_timeout is None else connect_timeout
        errors = []
        for url in self._endpoints.order():
            headers = {"Content-Type": "application/json"}
            if self._token:
                headers["Authorization"] = self._token
            self.stats.requests += 1
            self.stats.by_path["/v3/watch"] = self.stats.by_path.get("/v3/watch", 0) + 1
            try:
                resp = await self._http().post(
                    url + "/v3/watch",
                    data=payload,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=None),
                )
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                reraise_if_cancelled()
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            async with resp:
                if resp.status >= 400:
                    raw = await resp.read()
                    err = _request_error(_decode(raw, url), resp.status)
                    if _is_token_error(err) and self._user is not None:
                        self._token = None
                    raise err
                self._endpoints.good(url)
                try:
                    async for response in _watch_lines(resp, self.stats):
                        yield response
                except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
                    reraise_if_cancelled()
                    # RuntimeError: aiohttp's "Connection closed." when the pool shuts under it
                    self._endpoints.bad(url)
                    raise EtcdUnavailable(f"watch stream from {url} broke: {type(exc).__name__}: {exc}") from exc
                self._endpoints.bad(url)
                raise EtcdUnavailable(f"watch stream from {url} ended")
        raise EtcdUnavailable("no endpoint accepted the watch: " + "; ".join(errors))


async def _watch_lines(resp: aiohttp.ClientResponse, stats: ClientStats) -> AsyncIterator[WatchResponse]:
    """Decode the gateway's newline-delimited `{"result": ...}` objects."""
    buffer = b""
    async for chunk in resp.content.iter_any():
        stats.bytes_received += len(chunk)
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            message = _decode(line, "watch")
            if "error" in message:
                raise _request_error(message["error"] if isinstance(message["error"], dict) else message, 0)
            result = message.get("result", {})
            if result.get("compact_revision") and result.get("canceled"):
                raise EtcdCompacted(int(result["compact_revision"]))
            if result.get("canceled"):
                raise EtcdRequestError(f"watch canceled by etcd: {result.get('cancel_reason', 'no reason')}")
            events = tuple(
                WatchEvent(
                    type="DELETE" if e.get("type") == "DELETE" else "PUT",
                    kv=KeyValue.from_json(e.get("kv", {})),
                    prev_kv=KeyValue.from_json(e["prev_kv"]) if e.get("prev_kv") else None,
                )
                for e in result.get("events", [])
            )
            yield WatchResponse(
                revision=_revision(result),
                events=events,
                created=bool(result.get("created")),
                progress=not events and not result.get("created"),
            )


def _decode(raw: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(raw or b"{}")
    except ValueError as exc:
        raise EtcdRequestError(f"{where}: not a JSON reply: {raw[:200]!r}") from exc
    if not isinstance(value, dict):
        raise EtcdRequestError(f"{where}: unexpected reply {raw[:200]!r}")
    return value


def _revision(reply: Mapping[str, Any]) -> int:
    return int(reply.get("header", {}).get("revision", 0))


def _request_error(reply: Mapping[str, Any], status: int) -> EtcdRequestError:
    message = str(reply.get("message") or reply.get("error") or f"HTTP {status}")
    code = reply.get("code")
    code_int = int(code) if isinstance(code, (int, str)) and str(code).isdigit() else None
    if "authentication failed" in message:
        return EtcdAuthError(message, code_int)
    return EtcdRequestError(message, code_int)


def _retry_elsewhere(err: EtcdRequestError) -> bool:
    """Errors of one member, not of the request: a member without a leader or stopping."""
    text = str(err)
    return any(s in text for s in ("no leader", "leader changed", "server stopped", "not capable", "timed out"))


def _maybe_applied(err: EtcdRequestError) -> bool:
    """A proposal that timed out or crossed a leader change may still commit."""
    return any(s in str(err) for s in ("timed out", "leader changed"))


def _is_token_error(err: EtcdRequestError) -> bool:
    return err.code == _UNAUTHENTICATED or any(m in str(err) for m in _INVALID_TOKEN_MESSAGES[:2])
