"""Configuration of the probe-report endpoint (`probe:` in sentinel.yaml).

Reports from the in-worker probe can make Sentinel act (an OOM report leads to
`reduce_batch`), so who may send one is a setting with a safe default: the unix
socket only, whose file mode and group say who may connect; the TCP route of the
HTTP server stays off unless `tcp: true`, and then every report needs the bearer
token of the worker it claims (`workers[].probe_token_file`).
"""

from __future__ import annotations

import os
import re

from pydantic import Field, field_validator

from sentinel.config.base import Frozen

__all__ = ["DEFAULT_SOCKET_NAME", "ProbeConfig", "resolve_socket_path"]

DEFAULT_SOCKET_NAME = "probe.sock"
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


class ProbeConfig(Frozen):
    """Where the in-worker probe (`sentinel.probe`) delivers its reports, and their limits."""

    socket: str | None = Field(
        None,
        description="Unix socket for probe reports; default $RUNTIME_DIRECTORY/probe.sock "
        "(/run/sentinel/probe.sock under the shipped unit) when that variable is set; 'off' for none.",
    )
    socket_mode: int = Field(
        0o660, description="File mode of the socket (octal, e.g. '0660'): who may connect, so who may report."
    )
    socket_group: str | None = Field(
        None, description="Group that owns the socket (the workers' shared group); default Sentinel's own group."
    )
    tcp: bool = Field(
        False,
        description="Also accept reports on POST /api/v1/probe/report of the HTTP server; each needs "
        "the bearer token of the worker it claims (workers[].probe_token_file).",
    )
    max_report_bytes: int = Field(1024 * 1024, gt=0, le=16 * 1024 * 1024, description="Larger reports are refused.")
    max_series_per_report: int = Field(
        2048, gt=0, description="A report that would write more series is refused (400)."
    )
    max_series_per_worker: int = Field(
        4096,
        gt=0,
        description="Series one worker's probe may hold in the store; beyond it the oldest ended ones "
        "are dropped, then new ones refused (counted).",
    )

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, v: object) -> object:
        # YAML 1.1 reads 0660 as octal already; a quoted "0660" is octal too, never decimal 660.
        if isinstance(v, str):
            try:
                v = int(v, 8)
            except ValueError:
                raise ValueError(f"expected an octal file mode like '0660', got {v!r}") from None
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= 0o777:
            raise ValueError(f"expected a file mode between 0000 and 0777, got {v:o}")
        return v

    @field_validator("socket")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and v != "off" and not os.path.expandvars(v).startswith(("/", "$")):
            raise ValueError("expected an absolute path, or 'off'")
        return v


def resolve_socket_path(config: ProbeConfig, environ: dict[str, str] | None = None) -> str | None:
    """The socket path to serve, or None for no socket.

    `$RUNTIME_DIRECTORY` is systemd's `RuntimeDirectory=` (it may list several, separated
    by ':'; the first is Sentinel's own).
    """
    env = os.environ if environ is None else environ
    if config.socket == "off":
        return None
    if config.socket is not None:
        unset: list[str] = []

        def value_of(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2)
            if name not in env:
                unset.append(name)
            return env.get(name, "")

        path = _VARIABLE.sub(value_of, config.socket)
        if unset:
            raise ValueError(f"probe.socket: {config.socket!r} names the unset environment variable ${unset[0]}")
        return path
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime, DEFAULT_SOCKET_NAME) if runtime else None
