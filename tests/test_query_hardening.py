"""Hostile and careless queries (issue 15: F1-F4, C8, the 500s) against the engine and a real daemon.

Each attack is the exact one from the issue: a 4,500-term operator chain (SIGSEGV in
promql-parser), 8,000 nested parentheses (4.3 GB), a catastrophic regex against the
GPU UUIDs (15 s frozen), `max_over_time(x[100y:1ms])` (never ended), a 6,000-term rule
on SIGHUP (silent SIGSEGV). The daemon must answer each with a clear error, keep
`/-/healthy` under 1 s meanwhile, cancel queries whose client left, and stop on
SIGTERM within its budget.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from sentinel.alerting.templates import TemplateContext, render
from sentinel.promql import Engine, PromQLError, guard, syntax
from sentinel.promql.budget import CANCELLED, TIMED_OUT, TOO_MANY_SAMPLES, QueryBudget
from sentinel.store import Store
from tests.daemon_process import DaemonProcess

CHAIN_4500 = "-".join(["1"] * 4500)
PARENS_8000 = "(" * 8000 + "1" + ")" * 8000
CATASTROPHIC = '{uuid=~".{16}(.+)+Z"}'
RUNAWAY = "max_over_time(sentinel_gpu_up[100y:1ms])"


# -- the text guard (F1, F2) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (CHAIN_4500, "too deeply nested: 4500 levels"),
        (PARENS_8000, "too deeply nested: 8001 levels"),
        ("abs(" * 200 + "x" + ")" * 200, "too deeply nested"),
        ("-" * 300 + "1", "too deeply nested"),
        ("x" * (guard.MAX_QUERY_LENGTH + 1), "too long"),
        (" + ".join(["(" + " - ".join(["x"] * 100) + ")"] * 20), "too complex to parse"),
    ],
)
def test_oversized_queries_are_refused_before_the_parser(text: str, message: str) -> None:
    # Unguarded, the first would kill this test process with SIGSEGV.
    with pytest.raises(PromQLError, match=message):
        syntax.parse(text)


def test_the_guard_accepts_real_expressions_and_is_linear_on_any_text() -> None:
    for expr in (
        'sum by (gpu) (rate(x{a=~"b|c"}[5m])) > 0 and on(gpu) up == 1 unless max_over_time(y[10m]) < 3',
        " or ".join(f'z{{i="{i}"}}' for i in range(100)),
        "histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m]))) # a comment with ((((",
    ):
        syntax.parse(expr)
    junk = "\"'`{[(" * 50_000  # unbalanced quotes and brackets
    started = time.perf_counter()
    guard.measure(junk)
    assert time.perf_counter() - started < 5  # linear: a quadratic scan would take minutes


def test_a_chain_of_4500_terms_in_a_rule_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    from sentinel.alerting.rulefile import RuleFileError, load_rule_files

    rules = tmp_path / "r.yml"
    rules.write_text(f"groups:\n- name: g\n  rules:\n  - record: x\n    expr: {CHAIN_4500}\n")
    with pytest.raises(RuleFileError, match="query too deeply nested"):
        load_rule_files([str(rules)])


# -- regexes (F3) --------------------------------------------------------------------------


def test_catastrophic_regex_is_linear() -> None:
    store = Store()
    for g in range(8):
        # Python's backtracking `re` takes hours on this (time doubles per character).
        store.add("sentinel_gpu_info", 1, {"gpu": str(g), "uuid": f"GPU-{g}" + "a" * 60}, timestamp_ms=0)
    started = time.perf_counter()
    assert Engine(store).instant(CATASTROPHIC, 0) == []
    assert time.perf_counter() - started < 10


def test_one_regex_dialect_for_promql_and_templates() -> None:
    store = Store()
    store.add("m", 1, {"a": "aB"}, timestamp_ms=0)
    assert len(Engine(store).instant('m{a=~"a(?i)b"}', 0)) == 1  # type: ignore[arg-type]
    assert render('{{ match "a(?i)b" "aB" }}', TemplateContext(labels={}, value=1.0)) == "true"
    with pytest.raises(PromQLError, match="regex"):
        syntax.parse('m{a=~"("}')
    with pytest.raises(Exception, match="invalid escape sequence"):  # RE2-only syntax, not Go's
        render('{{ match "\\\\C" "a" }}', TemplateContext(labels={}, value=1.0))


# -- budgets (F4, C8) ----------------------------------------------------------------------


def _gpu_store() -> Store:
    store = Store(retention_ms=10**12)
    for g in range(8):
        for t in range(0, 600_000, 1000):
            store.add("sentinel_gpu_up", 1, {"gpu": str(g)}, timestamp_ms=t)
    return store


def test_a_runaway_subquery_ends_at_its_deadline() -> None:
    budget = QueryBudget(timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(PromQLError, match=TIMED_OUT):
        Engine(_gpu_store()).instant_query(RUNAWAY, 600_000, budget=budget)
    assert time.monotonic() - started < 10


def test_a_cancelled_query_ends_at_its_next_step() -> None:
    budget = QueryBudget()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            Engine(_gpu_store()).instant_query(RUNAWAY, 600_000, budget=budget)
        except PromQLError as exc:
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.2)
    budget.cancel()
    thread.join(10)
    assert not thread.is_alive() and str(failed[0]) == CANCELLED


def test_sample_limit_applies_to_selections_subqueries_and_range_results() -> None:
    engine = Engine(_gpu_store())
    for query in ("sentinel_gpu_up[10m]", "sentinel_gpu_up[10m:1s]", "count_over_time(sentinel_gpu_up[10m])"):
        with pytest.raises(PromQLError, match=TOO_MANY_SAMPLES):
            engine.instant_query(query, 600_000, budget=QueryBudget(max_samples=1000))
    with pytest.raises(PromQLError, match=TOO_MANY_SAMPLES):
        engine.range_query("sentinel_gpu_up", 0, 600_000, 1000, budget=QueryBudget(max_samples=1000))
    # Within the limit, the same queries answer.
    engine.instant_query("count_over_time(sentinel_gpu_up[1m])", 600_000, budget=QueryBudget(max_samples=1000))


# -- a real daemon -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("hardening")
    rules = tmp / "ok.rules.yml"
    rules.write_text("groups:\n- name: g\n  rules:\n  - record: gpus:up\n    expr: sum(sentinel_gpu_up)\n")
    config = tmp / "sentinel.yaml"
    config.write_text(
        "collectors:\n  nvml:\n    kernel_log: 'off'\n"
        f"rules:\n  files: [{json.dumps(str(rules))}]\n"
        "query:\n  timeout: 60s\n  max_concurrency: 2\n"
    )
    proc = DaemonProcess("-c", str(config), "--simulate", "healthy-8gpu", state_dir=tmp / "state")
    proc.rules_path = rules  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + 30
        while proc.get("/-/ready")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield proc
    finally:
        proc.stop(timeout=10)


def _post(daemon: DaemonProcess, path: str, params: dict[str, str], timeout: float = 30) -> tuple[int, dict]:  # type: ignore[type-arg]
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=timeout)
    try:
        body = urllib.parse.urlencode(params)
        conn.request("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _healthy_latency(daemon: DaemonProcess) -> float:
    started = time.monotonic()
    status, _, _ = daemon.get("/-/healthy")
    assert status == 200
    return time.monotonic() - started


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"query": CHAIN_4500}, "too deeply nested"),
        ({"query": PARENS_8000}, "too deeply nested"),
        ({"query": "up", "time": "1e300"}, "out of range"),
        ({"query": "up", "time": "99999999999999999999999999"}, "out of range"),
        ({"query": "up", "time": "2026-13-45T99:00:00Z"}, "cannot parse"),
        ({"query": "up @ 1e30"}, "invalid parameter"),
        ({"query": 'x{a=~"(?P<n"}'}, "regex"),
    ],
)
def test_bad_queries_get_400_not_500_or_a_crash(daemon: DaemonProcess, params: dict[str, str], error: str) -> None:
    status, body = _post(daemon, "/api/v1/query", params)
    assert status == 400 and body["errorType"] == "bad_data" and error in body["error"], body
    assert daemon.proc.poll() is None
    assert not any("Traceback" in line for line in daemon.lines)


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"query": "up", "start": "0", "end": "1e20", "step": "1e15"}, "out of range"),
        ({"query": "up", "start": "0", "end": "10", "step": "1e-9"}, "below 1ms"),
        ({"query": "up", "start": "0", "end": "10", "step": "nan"}, "zero or negative"),
        ({"query": "up", "start": "0", "end": "10", "step": "1e400"}, "out of range"),
        ({"query": "up", "start": "0", "end": "10", "step": "99999999999999999999y"}, "cannot parse"),
    ],
)
def test_absurd_ranges_and_steps_get_400(daemon: DaemonProcess, params: dict[str, str], error: str) -> None:
    status, body = _post(daemon, "/api/v1/query_range", params)
    assert status == 400 and error in body["error"], body


def test_catastrophic_regex_answers_quickly(daemon: DaemonProcess) -> None:
    started = time.monotonic()
    status, body = _post(daemon, "/api/v1/query", {"query": CATASTROPHIC})
    assert status == 200 and body["data"]["result"] == []
    assert time.monotonic() - started < 10


def test_healthy_answers_within_a_second_under_attack(daemon: DaemonProcess) -> None:
    stop = threading.Event()
    errors: list[str] = []

    def attack(params: dict[str, str]) -> None:
        while not stop.is_set():
            try:
                _post(daemon, "/api/v1/query", params, timeout=5)
            except (OSError, http.client.HTTPException):
                pass  # a runaway query's client gives up after 5 s, as the did
            except Exception as exc:
                errors.append(repr(exc))

    attacks = [{"query": CHAIN_4500}, {"query": PARENS_8000}, {"query": CATASTROPHIC}, {"query": RUNAWAY}] * 2
    threads = [threading.Thread(target=attack, args=(p,), daemon=True) for p in attacks]
    for thread in threads:
        thread.start()
    try:
        latencies = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            latencies.append(_healthy_latency(daemon))
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert max(latencies) < 1.0, latencies
    assert not errors, errors
    assert daemon.proc.poll() is None


def test_queries_of_clients_that_left_are_cancelled(daemon: DaemonProcess) -> None:
    # Two runaway queries fill both query slots; their clients leave after 0.5 s.
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", daemon.port))
        body = urllib.parse.urlencode({"query": RUNAWAY})
        sock.sendall(
            f"POST /api/v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        time.sleep(0.5)
        sock.close()
    # Without cancellation they would run for the whole 60 s timeout and this would queue.
    started = time.monotonic()
    status, body = _post(daemon, "/api/v1/query", {"query": "sum(sentinel_gpu_up)"}, timeout=30)
    assert status == 200 and body["data"]["result"]
    assert time.monotonic() - started < 5


def test_sighup_with_a_6000_term_rule_keeps_the_running_rules(daemon: DaemonProcess) -> None:
    rules: Path = daemon.rules_path  # type: ignore[attr-defined]
    good = rules.read_text()
    rules.write_text("groups:\n- name: g\n  rules:\n  - record: x\n    expr: " + "+".join(["1"] * 6000) + "\n")
    try:
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log(r"query too deeply nested", timeout=30)
        assert daemon.proc.poll() is None
        assert _post(daemon, "/api/v1/query", {"query": "gpus:up"})[0] == 200
    finally:
        rules.write_text(good)


def test_sigterm_ends_the_daemon_within_its_budget_while_queries_run(tmp_path: Path) -> None:
    config = tmp_path / "sentinel.yaml"
    config.write_text("collectors:\n  nvml:\n    kernel_log: 'off'\nquery:\n  timeout: 10m\n")
    proc = DaemonProcess("-c", str(config), "--simulate", "healthy-8gpu", state_dir=tmp_path / "state")
    try:
        clients = [
            threading.Thread(target=_post_quietly, args=(proc, {"query": RUNAWAY}), daemon=True) for _ in range(4)
        ]
        for client in clients:
            client.start()
        time.sleep(1.0)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 0
        assert time.monotonic() - started < 5
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


def _post_quietly(daemon: DaemonProcess, params: dict[str, str]) -> None:
    # The daemon goes away mid-answer, as intended.
    with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
        _post(daemon, "/api/v1/query", params, timeout=30)
