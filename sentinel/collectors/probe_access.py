"""Who may deliver a probe report for which worker.

A probe report can make Sentinel act (two reports with `num_ooms` 0 then 1 fire
`CudaOOM`, whose answer is `reduce_batch`), so a report is accepted only when all of
these hold:

- the worker it claims is configured with `probe: true` (a worker without the probe
  never reports; its name alone, listed by the open `GET /api/v1/workers`, is no
  credential);
- it came over a transport that is on: the unix socket (on by default; its file mode
  and group decide who may connect) or the HTTP server's TCP route (`probe.tcp`, off
  by default, reachable by every local user and, with a routable `listen`, the network);
- it carries the claimed worker's bearer token when that worker has one
  (`probe_token_file`), and over TCP the worker must have one. The token is compared
  in constant time with the claimed worker's token only, so a report for worker A
  sent with B's token is refused: a token binds reports to its worker.

Tokens are read from files (systemd credentials, like the control token) at start and
on every reload, off the event loop. No token, given or expected, is logged or echoed.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sentinel.config.models import WorkerConfig

__all__ = ["MIN_TOKEN_LENGTH", "TCP_OFF", "ProbeAccess", "Refusal", "Transport"]

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
_MAX_TOKEN_FILE_BYTES = 4096

Transport = Literal["unix", "tcp"]

TCP_OFF = (
    "probe reports over TCP are off: point the probe at the unix socket (probe.socket), "
    "or set probe.tcp: true and give the worker a probe_token_file"
)


@dataclass(frozen=True)
class Refusal:
    """Why a report is refused: an HTTP status and a message that names the remedy."""

    status: int
    message: str


@dataclass(frozen=True)
class _Worker:
    token: bytes | None = None
    problem: str | None = None  # a token file that is configured but unusable


@dataclass(frozen=True)
class ProbeAccess:
    """An immutable snapshot of the probe-enabled workers, their tokens and the transports on."""

    workers: Mapping[str, _Worker] = field(default_factory=dict)
    configured: frozenset[str] = frozenset()
    tcp: bool = False

    @classmethod
    def load(cls, workers: Iterable[WorkerConfig], *, tcp: bool) -> ProbeAccess:
        """Read every `probe_token_file` (blocking: call it from a thread)."""
        workers = tuple(workers)
        probed: dict[str, _Worker] = {}
        for worker in workers:
            if worker.probe:
                probed[worker.name] = _read_token(worker.name, worker.probe_token_file)
        return cls(probed, frozenset(w.name for w in workers), tcp)

    @classmethod
    def with_tokens(cls, tokens: Mapping[str, str | None], *, tcp: bool = True) -> ProbeAccess:
        """Probe-enabled workers with the given tokens (None: no token), for embedding and tests."""
        return cls(
            {name: _Worker(token.encode() if token else None) for name, token in tokens.items()},
            frozenset(tokens),
            tcp,
        )

    def refusal(self, worker: str, transport: Transport, authorization: str | None) -> Refusal | None:
        """None when a report claiming `worker` over `transport` with this header is accepted."""
        entry = self.workers.get(worker)
        if entry is None:
            if worker in self.configured:
                return Refusal(403, f"worker {worker!r} does not run the probe (set probe: true in sentinel.yaml)")
            return Refusal(403, f"worker {worker!r} is not configured")
        if transport == "tcp" and not self.tcp:
            return Refusal(403, TCP_OFF)
        if entry.problem is not None:
            return Refusal(403, entry.problem)
        if entry.token is None:
            if transport == "tcp":
                return Refusal(
                    403, f"worker {worker!r} has no probe_token_file: reports over TCP need one (or use the socket)"
                )
            return None  # the socket's mode and group are the gate
        given = _bearer(authorization)
        if given is None:
            return Refusal(401, f"worker {worker!r} reports need Authorization: Bearer <its probe token>")
        if not hmac.compare_digest(given, entry.token):
            return Refusal(403, f"wrong probe token for worker {worker!r}")
        return None


def _bearer(authorization: str | None) -> bytes | None:
    if not authorization:
        return None
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return None
    return given.encode()


def _read_token(worker: str, path: str | None) -> _Worker:
    if path is None:
        return _Worker()
    path = os.path.expandvars(path)
    try:
        info = os.stat(path)
        if info.st_size > _MAX_TOKEN_FILE_BYTES:
            problem = f"the probe token file of worker {worker!r} ({path}) is larger than {_MAX_TOKEN_FILE_BYTES} bytes"
            log.error("%s: its reports are refused", problem)
            return _Worker(problem=problem)
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        problem = f"cannot read the probe token file of worker {worker!r} ({path}: {exc.strerror or exc})"
        log.error("%s: its reports are refused", problem)
        return _Worker(problem=problem)
    if len(token) < MIN_TOKEN_LENGTH:
        problem = f"the probe token of worker {worker!r} in {path} is shorter than {MIN_TOKEN_LENGTH} characters"
        log.error("%s: its reports are refused", problem)
        return _Worker(problem=problem)
    if info.st_mode & stat.S_IROTH:
        log.warning("probe token file %s of worker %s is readable by every user; chmod 0640 it", path, worker)
    return _Worker(token=token)
