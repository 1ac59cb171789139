"""In-process fakes for `bench/race.py`: the webhook sink both paths deliver to, and vLLM-like workers.

`WebhookSink` is one aiohttp server on a loopback port with two paths, `/sentinel` and
`/alertmanager`. Both receive Alertmanager's version 4 webhook payload (Sentinel's
webhook notifier sends the same shape), so one parser records every firing alert of
either path with its arrival time, labels and `startsAt`.

`FakeVllm` serves `/health` and a vLLM-named `/metrics` (names of vLLM's
v1 loggers: `vllm:num_requests_running`, `vllm:generation_tokens_total`,
`vllm:iteration_tokens_total_count`, ...) whose counters advance with time, and has
the two fault knobs the race needs: `die()` (the engine died: `/health` answers 503
as vLLM does after `EngineDeadError`, nothing runs, nothing advances) and `stall()`
(an NCCL-hang-like wedge: requests stay running, `/health` stays 200, the token and
step counters freeze).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

__all__ = ["Arrival", "FakeVllm", "WebhookSink"]

SINK_PATHS = ("sentinel", "alertmanager")


@dataclass(frozen=True)
class Arrival:
    """One firing alert as it reached the sink."""

    path: str  # "sentinel" or "alertmanager"
    alertname: str
    labels: Mapping[str, str]
    at: float  # time.monotonic() on arrival
    starts_at_wall: float | None  # the payload's startsAt (when the alert began firing), Unix seconds


def _rfc3339(text: Any) -> float | None:
    if not isinstance(text, str) or text.startswith("0001-"):
        return None
    try:
        # Alertmanager writes nanoseconds; fromisoformat takes at most microseconds.
        head, dot, frac = text.rstrip("Z").partition(".")
        iso = head + (dot + frac[:6] if dot else "") + "+00:00"
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


class WebhookSink:
    """Records every firing alert POSTed to /sentinel or /alertmanager, first arrival kept per alert."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.bad_requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        """The URL of one of the two paths."""
        return f"http://127.0.0.1:{self.port}/{path}"

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        for path in SINK_PATHS:
            app.router.add_post(f"/{path}", self._handler(path))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _handler(self, path: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            # Stamp first: the parse below must not count towards the path's latency.
            at = time.monotonic()
            try:
                payload = json.loads(await request.read())
                alerts = payload["alerts"]
            except (ValueError, KeyError, TypeError):
                self.bad_requests += 1
                return web.Response(status=400, text="not an Alertmanager v4 webhook payload")
            for alert in alerts:
                if not isinstance(alert, dict) or alert.get("status") != "firing":
                    continue
                labels = {str(k): str(v) for k, v in (alert.get("labels") or {}).items()}
                self.arrivals.append(
                    Arrival(path, labels.get("alertname", ""), labels, at, _rfc3339(alert.get("startsAt")))
                )
            return web.Response(text="ok")

        return handle

    def first(self, path: str, alertname: str, labels: Mapping[str, str], after: float) -> Arrival | None:
        """The earliest arrival on `path` of `alertname` whose labels include `labels`, at or after `after`."""
        for arrival in self.arrivals:  # appended in arrival order
            if (
                arrival.path == path
                and arrival.alertname == alertname
                and arrival.at >= after
                and all(arrival.labels.get(k) == v for k, v in labels.items())
            ):
                return arrival
        return None


# -- a vLLM-like worker -------------------------------------------------------------------

# Family name (counters without `_total`, as in `# TYPE` lines) -> (type, help), vLLM's wording.
_FAMILIES = {
    "vllm:num_requests_running": ("gauge", "Number of requests in model execution batches."),
    "vllm:num_requests_waiting": ("gauge", "Number of requests waiting to be processed."),
    "vllm:kv_cache_usage_perc": ("gauge", "KV-cache usage. 1 means 100 percent usage."),
    "vllm:num_preemptions": ("counter", "Cumulative number of preemption from the engine."),
    "vllm:prompt_tokens": ("counter", "Number of prefill tokens processed."),
    "vllm:generation_tokens": ("counter", "Number of generation tokens processed."),
    "vllm:request_success": ("counter", "Count of successfully processed requests."),
    "vllm:iteration_tokens_total": ("histogram", "Histogram of number of tokens per engine_step."),
    "vllm:time_to_first_token_seconds": ("histogram", "Histogram of time to first token in seconds."),
    "vllm:e2e_request_latency_seconds": ("histogram", "Histogram of e2e request latency in seconds."),
}
# Histogram -> (bucket bounds, the bucket every observation falls in, mean observed value).
_HISTOGRAMS = {
    "vllm:iteration_tokens_total": ((1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), 64, 48.0),
    "vllm:time_to_first_token_seconds": ((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), 0.25, 0.18),
    "vllm:e2e_request_latency_seconds": ((0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0), 10.0, 7.5),
}


class FakeVllm:
    """A vLLM OpenAI server as Sentinel and Prometheus see it: /health and /metrics only."""

    def __init__(
        self,
        name: str,
        model: str = "Qwen/Qwen3-30B-A3B",
        running: int = 6,
        tokens_per_s: float = 240.0,
        steps_per_s: float = 20.0,
        requests_per_s: float = 0.8,
    ) -> None:
        self.name = name
        self.model = model
        self.health_status = 200
        self.running = running
        self.port = 0
        self._rates = (tokens_per_s, steps_per_s, requests_per_s)
        self._busy_s = 0.0  # seconds of engine progress so far: the counters are rates times this
        self._advancing = True
        self._last = time.monotonic()
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        """Base URL, as a worker's `endpoint` in sentinel.yaml."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- fault knobs ---------------------------------------------------------------------

    def die(self) -> None:
        """The engine died: /health answers 503, no request runs, the counters stop."""
        self._tick()
        self.health_status = 503
        # Requests of a dead engine fail at once; keeping them "running" would also
        # make the worker look stalled, a second fault this one does not model.
        self.running = 0
        self._advancing = False

    def stall(self) -> None:
        """The engine is wedged: requests stay running, /health stays 200, the counters freeze."""
        self._tick()
        self._advancing = False

    # -- HTTP ------------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        if self._advancing:
            self._busy_s += now - self._last
        self._last = now

    async def _health(self, request: web.Request) -> web.Response:
        # vLLM answers with an empty body either way.
        return web.Response(status=self.health_status)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.render().encode(), content_type="text/plain", charset="utf-8")

    def render(self) -> str:
        """The /metrics body now (Prometheus text format 0.0.4), as vLLM's v1 loggers name things."""
        self._tick()
        tokens_per_s, steps_per_s, requests_per_s = self._rates
        busy = self._busy_s
        base = f'model_name="{self.model}",engine="0"'
        steps = int(steps_per_s * busy)
        requests = int(requests_per_s * busy)
        generated = int(tokens_per_s * busy)
        lines: list[str] = []

        def family(name: str, samples: list[tuple[str, str, float]]) -> None:
            kind, help_ = _FAMILIES[name]
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for suffix, extra, value in samples:
                labels = base + (f",{extra}" if extra else "")
                lines.append(f"{name}{suffix}{{{labels}}} {value!r}")

        family("vllm:num_requests_running", [("", "", float(self.running))])
        family("vllm:num_requests_waiting", [("", "", 0.0)])
        family("vllm:kv_cache_usage_perc", [("", "", 0.31 if self.running else 0.0)])
        family("vllm:num_preemptions", [("_total", "", 0.0)])
        family("vllm:prompt_tokens", [("_total", "", float(generated * 3))])
        family("vllm:generation_tokens", [("_total", "", float(generated))])
        stop, length = 'finished_reason="stop"', 'finished_reason="length"'
        family("vllm:request_success", [("_total", stop, float(requests)), ("_total", length, 0.0)])
        counts = {"vllm:iteration_tokens_total": steps, "vllm:time_to_first_token_seconds": requests}
        counts["vllm:e2e_request_latency_seconds"] = requests
        for name, (bounds, lands_in, mean) in _HISTOGRAMS.items():
            count = counts[name]
            samples = [("_bucket", f'le="{float(b)}"', float(count if b >= lands_in else 0)) for b in bounds]
            samples += [("_bucket", 'le="+Inf"', float(count)), ("_count", "", float(count))]
            samples.append(("_sum", "", count * mean))
            family(name, samples)
        return "\n".join(lines) + "\n"
