"""The one HTTP client session shared by every endpoint collector.

aiohttp wants one `ClientSession` per application: it owns the connection pool, so
scrapes of the same worker reuse a keep-alive connection instead of paying a TCP
handshake every second. Collectors are rebuilt on every config reload, so the session
cannot belong to them: the daemon creates one `SharedHttpSession` at start-up, hands it
to each endpoint collector, and closes it at shutdown.
"""

from __future__ import annotations

import aiohttp

from sentinel import __version__

__all__ = ["SharedHttpSession"]


class SharedHttpSession:
    """Owner of a lazily created `aiohttp.ClientSession` (it must be made inside the loop)."""

    def __init__(self, *, connection_limit: int = 64, user_agent: str | None = None) -> None:
        self._limit = connection_limit
        self._user_agent = user_agent or f"sentinel/{__version__}"
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        """The session, created on first use; call from the event loop's thread."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=4)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": self._user_agent},
                # No proxies from the environment: endpoints are local workers, and an
                # http_proxy meant for downloads must not sit between Sentinel and them.
                trust_env=False,
            )
        return self._session

    @property
    def closed(self) -> bool:
        return self._session is None or self._session.closed

    async def close(self) -> None:
        """Close the pool; a later `get` opens a new one (useful for tests, not needed in the daemon)."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
