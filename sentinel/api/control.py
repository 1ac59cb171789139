"""The remediation HTTP API: worker state and the action journal (open), pause and resume (token).

Reads are open like the rest of the API and /metrics. Requests that change what
Sentinel does need `Authorization: Bearer <token>`, compared in constant time with
the contents of `control.token_file` (in production a systemd credential, e.g.
`$CREDENTIALS_DIRECTORY/control-token`). Without a usable token file the mutating
API is off: every such request gets 403 and a message saying how to turn it on.
No token, given or expected, is ever logged or echoed. A request without the header
gets 401 (with `WWW-Authenticate: Bearer`), one with a wrong token 403.

The server listens on 127.0.0.1:9847 unless `listen` says otherwise
(`sentinel.config.models.DEFAULT_LISTEN`): only local users reach the control API, and a
routable bind (for a remote Prometheus) still needs the token for anything that acts.

    GET  /api/v1/workers                    mode, pause, breaker, each worker's state
    GET  /api/v1/actions?limit=N&worker=W   the journal, newest first
    POST /api/v1/workers/{name}/pause       stop acting on one worker
    POST /api/v1/workers/{name}/resume      act again (also clears needs_human)
    POST /api/v1/pause                      stop acting on every worker
    POST /api/v1/resume                     act again on every worker
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from types import EllipsisType
from typing import Any

from aiohttp import web

from sentinel.remediation.engine import Remediator
from sentinel.remediation.settings import ControlConfig

__all__ = ["MIN_TOKEN_LENGTH", "ControlToken", "protected", "remediation_routes"]

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
MAX_TOKEN_FILE_BYTES = 4096
MAX_ACTIONS = 1000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"status": "error", "errorType": kind, "error": message}, status=status, headers=headers)


def _success(data: Any) -> web.Response:
    return web.json_response({"status": "success", "data": data})


class ControlToken:
    """The bearer token of the mutating API, read from a file at start and on reload."""

    def __init__(self, path: str | None) -> None:
        self.path = os.path.expandvars(path) if path else None
        self._token: bytes | None = None
        self._problem = "the control API is disabled: set control.token_file in sentinel.yaml"

    @classmethod
    def from_config(cls, control: ControlConfig) -> ControlToken:
        """A token source for `control.token_file` (not read yet: call `load` or `reload`)."""
        return cls(control.token_file)

    def __repr__(self) -> str:  # never show the token, even in a debugger or a traceback
        return f"ControlToken(path={self.path!r}, enabled={self.enabled})"

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def load(self) -> None:
        """(Re-)read the token file; a missing, unreadable, short or empty file disables the API."""
        self._token = None
        if self.path is None:
            self._problem = "the control API is disabled: set control.token_file in sentinel.yaml"
            log.info("control API disabled: no control.token_file configured")
            return
        try:
            info = os.stat(self.path)
            if info.st_size > MAX_TOKEN_FILE_BYTES:
                self._problem = f"the control API is disabled: {self.path} is larger than {MAX_TOKEN_FILE_BYTES} bytes"
                log.error("control API disabled: token file %s is too large to be a token", self.path)
                return
            token = Path(self.path).read_bytes().strip()
        except OSError as exc:
            self._problem = f"the control API is disabled: cannot read the token file {self.path} ({exc.strerror})"
            log.error("control API disabled: cannot read token file %s: %s", self.path, exc.strerror)
            return
        if len(token) < MIN_TOKEN_LENGTH:
            self._problem = (
                f"the control API is disabled: the token in {self.path} is shorter than {MIN_TOKEN_LENGTH} characters"
            )
            log.error("control API disabled: token file %s holds fewer than %d characters", self.path, MIN_TOKEN_LENGTH)
            return
        if info.st_mode & stat.S_IROTH:
            log.warning("control token file %s is readable by every user; chmod 0600 it", self.path)
        self._token = token
        log.info("control API enabled (token from %s)", self.path)

    async def reload(self, path: str | EllipsisType | None = ..., *, threads: Executor | None = None) -> None:
        """Read the file again on `threads` (default: asyncio's); with `path` (None: no file), switch files first."""
        if not isinstance(path, EllipsisType):
            self.path = os.path.expandvars(path) if path else None
        await asyncio.get_running_loop().run_in_executor(threads, self.load)

    def refusal(self, authorization: str | None) -> tuple[int, str] | None:
        """None when the Authorization header carries the token; else (status, message)."""
        if self._token is None:
            return 403, self._problem
        if not authorization:
            return 401, "this endpoint needs Authorization: Bearer <token>"
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return 401, "this endpoint needs Authorization: Bearer <token>"
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return 403, "wrong bearer token"
        return None


def protected(token: ControlToken, handler: Handler) -> Handler:
    """Wrap a mutating handler so it runs only with the bearer token (for silences too)."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        refused = token.refusal(request.headers.get("Authorization"))
        if refused is not None:
            status, message = refused
            log.warning("control API: refused %s %s from %s: %s", request.method, request.path, request.remote, message)
            headers = {"WWW-Authenticate": 'Bearer realm="sentinel"'} if status == 401 else None
            return _error(status, "unauthorized" if status == 401 else "forbidden", message, headers)
        return await handler(request)

    return guarded


def remediation_routes(remediator: Callable[[], Remediator | None], token: ControlToken) -> list[web.RouteDef]:
    """The routes above; `remediator` is called per request so the daemon can swap it."""

    def unavailable() -> web.Response:
        return _error(503, "unavailable", "remediation is not running")

    async def workers(request: web.Request) -> web.Response:
        engine = remediator()
        return unavailable() if engine is None else _success(engine.workers_json())

    async def actions(request: web.Request) -> web.Response:
        engine = remediator()
        if engine is None:
            return unavailable()
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            return _error(400, "bad_data", "limit: expected a whole number")
        if not 1 <= limit <= MAX_ACTIONS:
            return _error(400, "bad_data", f"limit: expected 1 to {MAX_ACTIONS}")
        return _success(await engine.actions_json(limit, request.query.get("worker") or None))

    def switch(verb: str, one_worker: bool) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            engine = remediator()
            if engine is None:
                return unavailable()
            name: str | None = None
            if one_worker:
                name = request.match_info["name"]
                if not engine.known_worker(name):
                    return _error(404, "not_found", f"no worker named {name!r}")
            log.warning(
                "control API: %s of %s requested from %s",
                verb,
                f"worker {name}" if name else "all workers",
                request.remote,
            )
            await (engine.pause(name) if verb == "pause" else engine.resume(name))
            return _success(engine.workers_json())

        return protected(token, handler)

    return [
        web.get("/api/v1/workers", workers),
        web.get("/api/v1/actions", actions),
        web.post("/api/v1/workers/{name}/pause", switch("pause", one_worker=True)),
        web.post("/api/v1/workers/{name}/resume", switch("resume", one_worker=True)),
        web.post("/api/v1/pause", switch("pause", one_worker=False)),
        web.post("/api/v1/resume", switch("resume", one_worker=False)),
    ]
