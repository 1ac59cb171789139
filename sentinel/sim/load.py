"""A small closed-loop load generator for an OpenAI-style `/v1/completions` endpoint.

`concurrency` clients each send one request, wait for the answer, and send the next,
until `stop()` (or a duration or request count). Prompts are `prompt_len` printable
ASCII characters drawn from a seeded generator: diverse text, so a MoE's routing sees
varied tokens (repeating one prompt would pile every token on the same experts), and
reproducible from run to run. Requests ask for `ignore_eos`, so each generates exactly
`max_tokens` tokens, as vLLM's benchmarks do. Successes, failures (by kind) and tokens
are counted; after a failure a client pauses briefly, so a dead worker is not hammered.
No torch needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from sentinel.runtime.timeouts import wait_for

__all__ = ["LoadGenerator", "LoadStats"]


@dataclass
class LoadStats:
    """What a load run achieved so far."""

    successes: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # "http_500", "connect", "timeout", ...
    latency_sum_s: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def requests(self) -> int:
        """Finished requests, successful or not."""
        return self.successes + self.failures

    def tokens_per_second(self) -> float:
        """Generated tokens per second since the run started."""
        return self.completion_tokens / max(time.monotonic() - self.started_at, 1e-9)


class LoadGenerator:
    """Closed-loop clients against `url` (the server's base URL); see the module doc."""

    def __init__(
        self,
        url: str,
        concurrency: int = 4,
        prompt_len: int = 16,
        max_tokens: int = 32,
        *,
        model: str | None = None,
        timeout: float = 30.0,
        seed: int = 0,
        retry_delay: float = 0.2,
    ) -> None:
        if concurrency < 1 or prompt_len < 1 or max_tokens < 1:
            raise ValueError("concurrency, prompt_len and max_tokens must be at least 1")
        self.url = url.rstrip("/") + "/v1/completions"
        self.concurrency = concurrency
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.model = model
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.stats = LoadStats()
        self._rng = random.Random(seed)
        self._stopping = asyncio.Event()
        self._clients: list[asyncio.Task[None]] = []
        self._task: asyncio.Task[LoadStats] | None = None

    def prompt(self) -> str:
        """The next prompt: `prompt_len` printable ASCII characters (one token each for a byte tokenizer)."""
        return "".join(chr(self._rng.randrange(33, 127)) for _ in range(self.prompt_len))

    def start(self, *, duration: float | None = None, requests: int | None = None) -> asyncio.Task[LoadStats]:
        """`run()` as a background task; `stop()` ends it."""
        self._task = asyncio.create_task(self.run(duration=duration, requests=requests))
        return self._task

    async def run(self, *, duration: float | None = None, requests: int | None = None) -> LoadStats:
        """Send load until `stop()`, `duration` seconds, or `requests` finished requests."""
        self.stats = LoadStats()
        self._stopping.clear()
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._clients = [asyncio.create_task(self._client(session, requests)) for _ in range(self.concurrency)]
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await wait_for(self._stopping.wait(), duration)
            finally:
                for client in self._clients:
                    client.cancel()
                await asyncio.gather(*self._clients, return_exceptions=True)
                self._clients = []
        return self.stats

    async def stop(self) -> LoadStats:
        """End the run: requests in flight are abandoned, not counted."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        return self.stats

    async def _client(self, session: aiohttp.ClientSession, limit: int | None) -> None:
        while not self._stopping.is_set():
            if limit is not None and self.stats.requests >= limit:
                self._stopping.set()
                return
            body: dict[str, object] = {"prompt": self.prompt(), "max_tokens": self.max_tokens, "ignore_eos": True}
            if self.model is not None:
                body["model"] = self.model
            started = time.monotonic()
            try:
                async with session.post(self.url, json=body) as resp:
                    payload = await resp.json(content_type=None)
                    if resp.status != 200:
                        self._fail(f"http_{resp.status}")
                        # A dead engine answers 500 at once: without a pause this loop would spin.
                        await asyncio.sleep(self.retry_delay)
                        continue
                usage = payload["usage"]
                self.stats.successes += 1
                self.stats.prompt_tokens += int(usage["prompt_tokens"])
                self.stats.completion_tokens += int(usage["completion_tokens"])
                self.stats.latency_sum_s += time.monotonic() - started
            except asyncio.TimeoutError:
                self._fail("timeout")
            except aiohttp.ClientConnectionError:
                self._fail("connect")
                await asyncio.sleep(self.retry_delay)
            except (aiohttp.ClientError, ValueError, KeyError, TypeError):
                self._fail("bad_response")
                await asyncio.sleep(self.retry_delay)

    def _fail(self, kind: str) -> None:
        self.stats.failures += 1
        self.stats.errors[kind] += 1
