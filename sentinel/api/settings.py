"""Configuration of Sentinel's HTTP server (`http:` in sentinel.yaml): who it answers, and its bounds."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from sentinel.config.base import Duration, Frozen

__all__ = ["HttpConfig"]

_HOST_NAME = re.compile(r"(?:\*|[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?\.?)\Z")


class HttpConfig(Frozen):
    """Bounds on connections and requests, and the host names Sentinel answers to."""

    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Host names Sentinel answers to besides IP addresses, localhost and this host's own "
        "names (a DNS-rebinding page uses a name of its own); '*' turns the check off.",
    )
    max_connections: int = Field(
        256,
        gt=0,
        le=8192,
        description="Open connections at once; beyond it the longest-idle one is closed, or the new one "
        "when every connection is busy.",
    )
    header_timeout: Duration = Field(
        10.0, gt=0, description="A connection that has not sent a complete request head by then is closed."
    )
    body_timeout: Duration = Field(10.0, gt=0, description="Time to receive a request body; then 408.")
    max_body_bytes: int = Field(1024 * 1024, gt=0, le=64 * 1024 * 1024, description="Larger request bodies get 413.")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not _HOST_NAME.match(name):
                raise ValueError(f"{name!r}: expected a host name without port or scheme, or '*'")
        return tuple(name.lower().rstrip(".") for name in v)
