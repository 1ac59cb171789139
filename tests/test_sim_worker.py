"""The simulated worker end to end: real `python -m sentinel.sim.worker` processes on free ports.

One worker (fp32, MAX_NUM_SEQS=4) serves the API, metrics, batching, probe, skew, stall
and small-batch budget tests; a pair started together (fp32 and int8, both
MAX_NUM_SEQS=16) serves the memory-budget comparison, and the int8 one is then crashed.
Workers attach the real `sentinel.probe`, reporting to a stand-in for the daemon's probe
endpoint. The worker's stderr also goes through Sentinel's own log pattern catalogue,
so these tests check that the lines it prints are the events Sentinel recognises.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import pytest

from tests.conftest import require_module

require_module("torch")
require_module("transformers")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from sentinel.logs import Catalogue, LogMatcher  # noqa: E402
from sentinel.sim.load import LoadGenerator  # noqa: E402

SERVING = re.compile(r"Starting vLLM API server 0 on (http://[\d.]+:\d+)")
EPLB = re.compile(r"EPLB step: \d+ for model sim/tiny-qwen3-moe: .*balancedness=(\d\.\d{4}), steps until")
PROMPT_LEN, MAX_TOKENS = 16, 48


class FakeDaemon:
    """Stands in for the daemon's probe endpoint: keeps the reports, answers with `batch_limit`."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.batch_limit: int | None = None
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                daemon.reports.append(json.loads(self.rfile.read(length)))
                body = json.dumps({"batch_limit": daemon.batch_limit}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WorkerProcess:
    """One worker subprocess: its stderr lines, its base URL, async HTTP helpers."""

    def __init__(self, *args: str, **env: str) -> None:
        full_env = {k: v for k, v in os.environ.items() if k != "SENTINEL_PROBE_URL"}
        full_env.update({"VLLM_LOG_STATS_INTERVAL": "0.5", **env})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sentinel.sim.worker", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self.base = ""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:  # closed at EOF, however the worker ended
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                self._queue.put(line)

    def wait_ready(self, timeout: float = 90) -> WorkerProcess:
        self.base = self.wait_for_log(SERVING, timeout).group(1)
        return self

    def mark(self) -> int:
        """Where the log stands now; `wait_for_log(..., since=mark)` looks only at later lines."""
        return len(self.lines)

    def wait_for_log(self, pattern: re.Pattern[str] | str, timeout: float = 30, since: int = 0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for line in self.lines[seen:]:
                if m := regex.search(line):
                    return m
            seen = max(seen, len(self.lines))
            if time.monotonic() > deadline:
                break
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    time.sleep(0.2)  # the pump may still hold the last lines
                    if len(self.lines) == seen:
                        break
        raise AssertionError(f"no log line matching {regex.pattern!r}; got:\n" + "\n".join(self.lines[-60:]))

    async def log(self, pattern: re.Pattern[str] | str, timeout: float = 30, since: int = 0) -> re.Match[str]:
        """`wait_for_log` off the event loop, so that load generated in the test keeps flowing."""
        return await asyncio.to_thread(self.wait_for_log, pattern, timeout, since)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.request(method, self.base + path, json=body) as resp,
        ):
            text = await resp.text()
            is_json = resp.content_type == "application/json"
            return resp.status, (await resp.json() if is_json else text)

    async def metrics(self) -> dict[str, float]:
        status, text = await self.request("GET", "/metrics")
        assert status == 200
        return {
            sample.name
            + ("" if not sample.labels.get("finished_reason") else f"/{sample.labels['finished_reason']}"): (
                sample.value
            )
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.name.endswith("_bucket")
        }

    async def fault(self, **body: Any) -> None:
        status, reply = await self.request("POST", "/admin/fault", body)
        assert status == 200, reply

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def daemon() -> Iterator[FakeDaemon]:
    d = FakeDaemon()
    yield d
    d.close()


@pytest.fixture(scope="module")
def worker(daemon: FakeDaemon) -> Iterator[WorkerProcess]:
    """fp32, MAX_NUM_SEQS=4, probed: shared by the tests that leave it healthy."""
    w = WorkerProcess(
        MAX_NUM_SEQS="4", SENTINEL_PROFILE="reduced", SENTINEL_WORKER="sim-a", SENTINEL_PROBE_URL=daemon.url
    ).wait_ready()
    yield w
    assert w.stop() == 0, "\n".join(w.lines[-40:])


@pytest.fixture(scope="module")
def budget_pair(
    daemon: FakeDaemon, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    """fp32 and int8 workers with MAX_NUM_SEQS=16, started together so their start-ups overlap.

    The int8 one reads its profile from a file, as a systemd unit's EnvironmentFile= holds it.
    """
    profile = tmp_path_factory.mktemp("worker") / "int8.env"
    profile.write_text('# the quantized fallback rung\nQUANTIZATION="int8"\nSENTINEL_PROFILE=int8\n')
    pair = (
        WorkerProcess(MAX_NUM_SEQS="16", SENTINEL_WORKER="sim-fp32", SENTINEL_PROBE_URL=daemon.url),
        WorkerProcess("--profile-env", str(profile), MAX_NUM_SEQS="16", QUANTIZATION="none"),
    )
    try:
        yield pair[0].wait_ready(), pair[1].wait_ready()
    finally:
        for w in pair:
            w.stop()


def load(w: WorkerProcess, concurrency: int, *, seed: int = 0) -> LoadGenerator:
    return LoadGenerator(w.base, concurrency=concurrency, prompt_len=PROMPT_LEN, max_tokens=MAX_TOKENS, seed=seed)


def events(w: WorkerProcess) -> list[str]:
    """Sentinel's log events in the worker's stderr, by id."""
    return [m.event for m in LogMatcher(Catalogue.load()).scan("\n".join(w.lines) + "\n")]


# -- the shared fp32 worker ------------------------------------------------------------------


async def test_completion_returns_text_and_usage(worker: WorkerProcess) -> None:
    status, reply = await worker.request(
        "POST", "/v1/completions", {"model": "sim/tiny-qwen3-moe", "prompt": "Hello, MoE!", "max_tokens": 12}
    )
    assert status == 200, reply
    assert reply["object"] == "text_completion" and reply["model"] == "sim/tiny-qwen3-moe"
    choice = reply["choices"][0]
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len("Hello, MoE!")
    assert 1 <= usage["completion_tokens"] <= 12 and len(choice["text"]) == usage["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] in ("length", "stop")

    status, reply = await worker.request(
        "POST", "/v1/completions", {"prompt": "x", "max_tokens": 5, "ignore_eos": True}
    )
    assert (status, reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]) == (200, 5, "length")
    status, reply = await worker.request("POST", "/v1/completions", {"model": "other", "prompt": "x"})
    assert status == 404 and "does not exist" in reply["error"]["message"]
    status, reply = await worker.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1000})
    assert status == 400 and "maximum context length is 256 tokens" in reply["error"]["message"]
    status, reply = await worker.request("POST", "/v1/completions", {"max_tokens": 4})
    assert status == 400 and reply["error"]["type"] == "BadRequestError"


async def test_health_and_metrics_speak_vllm(worker: WorkerProcess) -> None:
    status, body = await worker.request("GET", "/health")
    assert (status, body) == (200, "")
    before = await worker.metrics()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total/length",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:iteration_tokens_total_count",
    ):
        assert name in before, name
    assert not any(name.endswith("_created") for name in before)
    _, text = await worker.request("GET", "/metrics")
    assert 'vllm:generation_tokens_total{engine="0",model_name="sim/tiny-qwen3-moe"}' in text

    for _ in range(2):
        status, _ = await worker.request(
            "POST", "/v1/completions", {"prompt": "abc", "max_tokens": 8, "ignore_eos": True}
        )
        assert status == 200
    after = await worker.metrics()
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 16
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == 6
    assert after["vllm:request_success_total/length"] - before["vllm:request_success_total/length"] == 2
    assert after["vllm:iteration_tokens_total_count"] > before["vllm:iteration_tokens_total_count"]


async def test_running_never_exceeds_max_num_seqs(worker: WorkerProcess) -> None:
    gen = load(worker, concurrency=12)
    gen.start()
    running, waiting = [], []
    try:
        for _ in range(15):
            m = await worker.metrics()
            running.append(m["vllm:num_requests_running"])
            waiting.append(m["vllm:num_requests_waiting"])
            await asyncio.sleep(0.1)
    finally:
        stats = await gen.stop()
    _, state = await worker.request("GET", "/admin/state")
    assert max(running) <= 4 and max(waiting) > 0, (running, waiting)
    assert state["engine"]["max_running_seen"] == 4
    assert stats.successes > 0 and stats.failures == 0
    print(f"\nfp32 MAX_NUM_SEQS=4, 12 clients: {stats.tokens_per_second():.0f} generated tokens/s")
    worker.wait_for_log(r"Engine 000: Avg prompt throughput: [\d.]+ tokens/s, .*Running: \d reqs, Waiting: \d+ reqs")


async def test_probe_reports_expert_load_and_its_batch_limit_caps_the_engine(
    worker: WorkerProcess, daemon: FakeDaemon
) -> None:
    await worker.log(r"Sentinel probe attached for worker sim-a")
    gen = load(worker, concurrency=8, seed=2)
    gen.start()
    try:
        deadline = time.monotonic() + 10
        while not [r for r in daemon.reports if r["worker"] == "sim-a" and any(x["tokens"] for x in r["layers"])]:
            assert time.monotonic() < deadline, daemon.reports[-3:]
            await asyncio.sleep(0.2)
        daemon.batch_limit = 2  # Sentinel's live reduce_batch, answered to the next report
        deadline = time.monotonic() + 10
        while (await worker.request("GET", "/admin/state"))[1]["batch_limit"] != 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.2)
        running = [(await worker.metrics())["vllm:num_requests_running"] for _ in range(10)]
        daemon.batch_limit = 4
        deadline = time.monotonic() + 10
        while (await worker.request("GET", "/admin/state"))[1]["batch_limit"] != 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    finally:
        await gen.stop()
    assert max(running) <= 2, running
    report = next(r for r in reversed(daemon.reports) if r["worker"] == "sim-a" and r["kind"] == "interval")
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    assert set(report["gpus"]) == {"0", "1", "2", "3"}


async def test_skew_fault_drops_eplb_balancedness_below_0_7(worker: WorkerProcess) -> None:
    gen = load(worker, concurrency=8, seed=1)
    gen.start()
    try:
        await worker.log(EPLB, since=worker.mark())
        # One 0.5 s window of a random model's routing falls below 0.7 now and then (about 1 in 13
        # measured); the median of five windows fully under load does not.
        windows = [float((await worker.log(EPLB, since=worker.mark())).group(1)) for _ in range(5)]
        healthy = statistics.median(windows)
        await worker.fault(kind="skew", experts=[0, 1], bias=10.0)
        skewed = 1.0
        for _ in range(40):  # windows, not seconds: a loaded machine makes them longer, not fewer
            skewed = float((await worker.log(EPLB, since=worker.mark(), timeout=60)).group(1))
            if skewed < 0.7:
                break
        _, state = await worker.request("GET", "/admin/state")
    finally:
        await worker.fault(kind="clear")
        await gen.stop()
    assert healthy > 0.7, windows
    assert skewed < 0.7
    assert state["faults"]["skew"] == {"experts": [0, 1], "bias": 10.0}
    assert "expert_balancedness" in events(worker)


async def test_stall_keeps_health_200_while_generation_stops(worker: WorkerProcess) -> None:
    gen = load(worker, concurrency=6)
    gen.start()
    try:
        await worker.log(EPLB, since=worker.mark())  # a step has run under load
        await worker.fault(kind="stall", seconds=20)
        mark = worker.mark()
        # The step in flight ends, then the loop blocks: wait for the counter to hold still
        # rather than for a fixed time, which a loaded machine can outlast.
        frozen = await generation_frozen(worker)
        during = []
        for _ in range(8):
            status, _ = await worker.request("GET", "/health")
            m = await worker.metrics()
            during.append((status, m["vllm:generation_tokens_total"], m["vllm:num_requests_running"]))
            await asyncio.sleep(0.2)
        await worker.log(r"Avg generation throughput: 0\.0 tokens/s, Running: [1-6] reqs", since=mark, timeout=60)
        await worker.fault(kind="clear")  # the stall ends now, not after a guess at how long the test takes
        resumed = frozen
        for _ in range(300):
            resumed = (await worker.metrics())["vllm:generation_tokens_total"]
            if resumed > frozen:
                break
            await asyncio.sleep(0.1)
    finally:
        await gen.stop()
    assert all(status == 200 for status, _, _ in during)
    assert all(tokens == frozen for _, tokens, _ in during), during
    assert all(running > 0 for _, _, running in during)
    assert resumed > frozen


async def generation_frozen(worker: WorkerProcess) -> float:
    """The generated-token count once it has stopped moving for a second."""
    last, still_since = None, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tokens = (await worker.metrics())["vllm:generation_tokens_total"]
        if tokens != last:
            last, still_since = tokens, time.monotonic()
        elif time.monotonic() - still_since >= 1.0:
            return tokens
        await asyncio.sleep(0.1)
    raise AssertionError("generation never stopped under the stall fault")


async def test_smaller_batch_profile_stays_under_a_budget_that_needs_more(worker: WorkerProcess) -> None:
    _, state = await worker.request("GET", "/admin/state")
    mem = state["memory"]
    context = PROMPT_LEN + MAX_TOKENS
    budget = mem["weights_bytes"] + 5 * context * mem["per_token_bytes"]  # room for 5 full sequences, not 16
    await worker.fault(kind="memory_budget", bytes=budget)
    try:
        stats = await load(worker, concurrency=8).run(requests=16)
        _, state = await worker.request("GET", "/admin/state")
    finally:
        await worker.fault(kind="clear")
    assert stats.failures == 0 and state["alive"]
    assert state["memory"]["peak_footprint_bytes"] <= budget


# -- the fp32 / int8 pair: the same budget, with and without quantization ----------------------


async def test_memory_budget_ooms_fp32_and_int8_fits(
    budget_pair: tuple[WorkerProcess, WorkerProcess], daemon: FakeDaemon
) -> None:
    fp32, int8 = budget_pair
    _, s32 = await fp32.request("GET", "/admin/state")
    _, s8 = await int8.request("GET", "/admin/state")
    assert (s8["quantization"], s8["profile"]["name"]) == ("int8", "int8")  # the file overrides the environment
    w32, w8, per_token = s32["memory"]["weights_bytes"], s8["memory"]["weights_bytes"], s32["memory"]["per_token_bytes"]
    print(f"\nweights: fp32 {w32} bytes, int8 {w8} bytes ({w32 / w8:.2f}x smaller); {per_token} bytes per token")
    assert w8 * 2.5 < w32 and s8["memory"]["weights_bytes_fp32"] == w32
    full = 16 * (PROMPT_LEN + MAX_TOKENS) * per_token
    budget = w32 + full // 3  # fp32 at 16 sequences needs more; int8 saves more than that in weights
    assert w8 + full < budget < w32 + full

    for w in budget_pair:
        await w.fault(kind="memory_budget", bytes=budget)
    fp32_stats, int8_stats = await asyncio.gather(
        load(fp32, concurrency=16).run(requests=48, duration=30), load(int8, concurrency=16).run(requests=48)
    )

    # fp32: a real torch.OutOfMemoryError in PyTorch's words, the engine dies, the process exits non-zero.
    assert fp32.proc.wait(120) != 0  # an OOM'd engine takes a while to exit under load
    fp32.wait_for_log(
        r"^torch\.OutOfMemoryError: CUDA out of memory\. Tried to allocate [\d.]+ (?:bytes|KiB|MiB)\. GPU 0 has a "
        r"total capacity of [\d.]+ MiB of which [\d.]+ (?:bytes|KiB|MiB) is free\. Including non-PyTorch memory, "
        r"this process has [\d.]+ MiB memory in use\."
    )
    fp32.wait_for_log(r"^ERROR \d\d-\d\d [\d:]+ \[engine\.py:\d+\] EngineCore encountered a fatal error\.$")
    fp32.wait_for_log(r"^Traceback \(most recent call last\):$")
    assert fp32_stats.failures > 0
    assert {"cuda_oom", "engine_dead"} <= set(events(fp32))
    oom = [r for r in daemon.reports if r["worker"] == "sim-fp32" and r["kind"] == "oom"]
    assert oom and oom[0]["oom"]["message"].startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate")

    # int8 under the same budget: everything served, the engine alive.
    _, s8 = await int8.request("GET", "/admin/state")
    assert int8_stats.failures == 0 and int8_stats.successes >= 48
    assert s8["alive"] and s8["memory"]["peak_footprint_bytes"] <= budget
    assert not any("OutOfMemoryError" in line for line in int8.lines)
    print(f"int8 MAX_NUM_SEQS=16 under the budget: {int8_stats.tokens_per_second():.0f} generated tokens/s")


async def test_crash_prints_nccl_watchdog_lines_and_exits_nonzero(
    budget_pair: tuple[WorkerProcess, WorkerProcess],
) -> None:
    w = budget_pair[1]
    await w.fault(kind="crash", after_seconds=0.5)
    status, _ = await w.request("GET", "/health")
    assert status == 200  # hung, not yet dead
    assert w.proc.wait(120) != 0
    w.wait_for_log(
        r"^\[rank0\]:\[E\d{3,4} \d\d:\d\d:\d\d\.\d{3} ProcessGroupNCCL\.cpp:\d+\] \[PG ID 0 PG GUID 0\(default_pg\) "
        r"Rank 0\] Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=\d+, OpType=ALLREDUCE, "
        r"NumelIn=\d+, NumelOut=\d+, Timeout\(ms\)=600000\) ran for \d+ milliseconds before timing out\.$"
    )
    w.wait_for_log(r"To avoid data inconsistency, we are taking the entire process down\.$")
    w.wait_for_log(r"EngineCore encountered a fatal error\.$")
    found = events(w)
    assert found.count("collective_timeout") == 1
    assert {"process_group_abort", "engine_dead"} <= set(found)
