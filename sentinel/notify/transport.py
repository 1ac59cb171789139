"""One HTTP POST to a receiver, turned into a verdict the delivery loop can act on."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from sentinel import __version__
from sentinel.notify.secrets import Scrubber

__all__ = ["USER_AGENT", "SendResult", "header_value", "parse_retry_after", "post"]

USER_AGENT = f"sentinel/{__version__}"

# The receiver will never take this payload: retrying it would only block the queue.
_PERMANENT = frozenset({400, 413, 422})
_BODY_SNIPPET = 300


@dataclass(frozen=True)
class SendResult:
    """The verdict on one delivery try."""

    ok: bool
    error: str = ""
    retry_after: float | None = None  # seconds the receiver asked us to wait (429/503 Retry-After)
    permanent: bool = False  # rejected for good: drop rather than retry

    @classmethod
    def success(cls) -> SendResult:
        return cls(True)


def header_value(text: str) -> str:
    """`text` safe for an HTTP header: non-ASCII and control characters percent-encoded.

    Dedup keys carry worker names from the config; a newline there must not become a
    header of its own, and non-ASCII must not fail the request.
    """
    return quote(text, safe="".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%"))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout_s: float,
    scrubber: Scrubber,
) -> SendResult:
    """POST `body` as JSON; a 2xx answer is success. Error text is scrubbed of secrets."""
    all_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers}
    try:
        async with session.post(
            url,
            data=body,
            headers=all_headers,
            # A connection that takes half the budget is not coming; failing on it says so
            # ("Connection timeout to host ...") instead of a bare timeout.
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=timeout_s / 2),
            # A redirect would send the payload (and maybe a signature) somewhere unconfigured.
            allow_redirects=False,
        ) as resp:
            if 200 <= resp.status < 300:
                await resp.read()  # drain so the connection goes back to the pool
                return SendResult.success()
            snippet = (await resp.content.read(_BODY_SNIPPET)).decode("utf-8", "replace").strip()
            error = f"HTTP {resp.status}" + (f": {snippet}" if snippet else "")
            return SendResult(
                False,
                error=scrubber.scrub(error),
                retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                permanent=resp.status in _PERMANENT,
            )
    except aiohttp.ClientError as exc:
        # aiohttp quotes the URL in several errors ("Connection timeout to host http://...").
        return SendResult(False, error=scrubber.scrub(f"{type(exc).__name__}: {exc}"))
    except asyncio.TimeoutError:  # before OSError: on 3.11 it is the builtin TimeoutError, an OSError
        return SendResult(False, error=f"no answer within {timeout_s:g}s")
    except (OSError, ValueError) as exc:
        return SendResult(False, error=scrubber.scrub(f"{type(exc).__name__}: {exc}"))
