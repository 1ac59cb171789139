"""A real etcd cluster (1 or 3 members) on free loopback ports: the fleet demo, tests, benchmarks.

Uses Debian's `etcd` binary (package `etcd-server`; `EtcdMissing` says so when it is
absent). Start-up waits on readiness — every member's /health says true and the
cluster has a leader — never on a fixed sleep. Members can be killed
(SIGKILL), stopped and restarted with their data, to test failover. `close()` always
kills every process it started and removes the data directories.

Data lives under /dev/shm when it exists: fsync on a loaded shared disk would otherwise
dominate every write's latency and make timing-sensitive tests flaky.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EtcdCluster", "EtcdMember", "EtcdMissing", "free_port", "running_cluster"]


class EtcdMissing(RuntimeError):
    """The etcd binary is not installed."""


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the test process dies, even by SIGKILL or a
    `timeout`, so no etcd outlives its run on a shared machine (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    tls: bool = False
    extra: list[str] = field(default_factory=list)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """`size` members named m0..m{size-1}. Use as a context manager or call close()."""

    def __init__(
        self,
        size: int = 1,
        *,
        etcd: str = "etcd",
        base_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        tls: dict[str, Path] | None = None,
    ) -> None:
        self.etcd = etcd
        root = Path("/dev/shm") if Path("/dev/shm").is_dir() and base_dir is None else base_dir
        self.dir = Path(tempfile.mkdtemp(prefix="sentinel-etcd-", dir=root))
        self.extra_args = list(extra_args)
        self.tls = tls
        self.token = f"sentinel-test-{os.getpid()}-{time.monotonic_ns()}"
        self.members = [
            EtcdMember(
                name=f"m{i}",
                client_port=0,
                peer_port=0,
                data_dir=self.dir / f"m{i}",
                log_path=self.dir / f"m{i}.log",
                tls=tls is not None,
            )
            for i in range(size)
        ]
        self.ca_file = tls["ca"] if tls else None

    # -- start / stop ---------------------------------------------------------------------

    def _argv(self, m: EtcdMember, state: str) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        argv = [
            self.etcd,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", state,
            "--logger", "zap",
            "--log-level", "warn",
            *self.extra_args,
        ]  # fmt: skip
        if self.tls:
            argv += [
                "--cert-file", str(self.tls["cert"]),
                "--key-file", str(self.tls["key"]),
                "--trusted-ca-file", str(self.tls["ca"]),
                "--client-cert-auth",
            ]  # fmt: skip
        return argv

    def _spawn(self, m: EtcdMember, state: str) -> None:
        if shutil.which(self.etcd) is None:
            raise EtcdMissing(
                f"{self.etcd} not found: install Debian's etcd (apt-get install etcd-server etcd-client), "
                "or put an etcd 3.4+ binary on PATH"
            )
        log = m.log_path.open("ab")
        try:
            m.proc = subprocess.Popen(
                self._argv(m, state), stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        finally:
            log.close()

    def start(self, timeout: float = 60.0) -> EtcdCluster:
        """Start every member on fresh ports; retry on a port taken meanwhile."""
        for attempt in range(3):
            for m in self.members:
                m.client_port, m.peer_port = free_port(), free_port()
                shutil.rmtree(m.data_dir, ignore_errors=True)
            for m in self.members:
                self._spawn(m, "new")
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                logs = self.logs()
                self._kill_all()
                if "address already in use" not in logs or attempt == 2:
                    raise
        return self

    def wait_ready(self, timeout: float = 60.0, members: Sequence[EtcdMember] | None = None) -> None:
        """Every (given) member healthy and a leader elected."""
        deadline = time.monotonic() + timeout
        targets = list(members) if members is not None else [m for m in self.members if m.alive()]
        pending = list(targets)
        while pending:
            for m in list(pending):
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd member {m.name} exited ({m.proc.returncode}):\n{self.logs()}")
                if self._healthy(m):
                    pending.remove(m)
            if pending:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"etcd members {[m.name for m in pending]} not ready in {timeout}s:\n{self.logs()}"
                    )
                time.sleep(0.05)
        while self.leader_index() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd cluster elected no leader in {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def _open(self, url: str, body: bytes | None = None, timeout: float = 1.0) -> bytes:
        request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
        ctx = None
        if self.tls:
            import ssl

            ctx = ssl.create_default_context(cafile=str(self.tls["ca"]))
            cert, key = self.tls.get("client_cert", self.tls["cert"]), self.tls.get("client_key", self.tls["key"])
            ctx.load_cert_chain(str(cert), str(key))
        with urllib.request.urlopen(request, timeout=timeout, context=ctx) as resp:
            return bytes(resp.read())

    def _healthy(self, m: EtcdMember) -> bool:
        try:
            return bool(json.loads(self._open(m.client_url + "/health")).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def status(self, m: EtcdMember) -> dict[str, object] | None:
        try:
            value = json.loads(self._open(m.client_url + "/v3/maintenance/status", b"{}"))
            return value if isinstance(value, dict) else None
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def leader_index(self) -> int | None:
        """Index of the member that leads the raft group now (None: no leader)."""
        for i, m in enumerate(self.members):
            if not m.alive():
                continue
            st = self.status(m)
            header = st.get("header") if st else None
            member_id = header.get("member_id") if isinstance(header, dict) else None
            if st and st.get("leader") and str(st.get("leader")) == str(member_id):
                return i
        return None

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def kill(self, index: int) -> None:
        """SIGKILL one member (a crash)."""
        m = self.members[index]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(timeout=30)

    def restart(self, index: int, timeout: float = 60.0) -> None:
        """Start a killed member again with its data."""
        m = self.members[index]
        self.kill(index)
        self._spawn(m, "existing")
        self.wait_ready(timeout, members=[m])

    def logs(self) -> str:
        out = []
        for m in self.members:
            with contextlib.suppress(OSError):
                out.append(f"--- {m.name} ---\n" + m.log_path.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def _kill_all(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.kill()
            if m.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(timeout=30)

    def close(self) -> None:
        self._kill_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running_cluster(size: int = 1, **kwargs: object) -> Iterator[EtcdCluster]:
    """Start a cluster, yield it, always close it."""
    cluster = EtcdCluster(size, **kwargs)  # type: ignore[arg-type]  # the keywords of EtcdCluster
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
