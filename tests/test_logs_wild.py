"""The catalogue over real log excerpts from public bug reports, and hostile lines.

tests/data/logs-wild/ holds one file per excerpt with its source, a licence note and
the events each line must produce (`-` for ordinary lines, which must stay silent).
`python -m tests.logs_wild` prints recall and false alarms per event.
"""

from __future__ import annotations

import time

import pytest

from sentinel.logs import Catalogue, LogMatcher
from sentinel.logs.prefilter import hyperscan_available
from tests.logs_wild import load_corpus, score

CORPUS = load_corpus()
ENGINES = ["re2", pytest.param("hyperscan", marks=pytest.mark.skipif(not hyperscan_available(), reason="no wheel"))]


@pytest.fixture(scope="module", params=ENGINES)
def matcher(request: pytest.FixtureRequest) -> LogMatcher:
    return LogMatcher(Catalogue.load(), engine=request.param)


def test_corpus_covers_every_family_the_catalogue_names_with_ordinary_lines_around_them() -> None:
    expected = {event for line in CORPUS for event in line.expected}
    assert {
        "engine_dead",
        "cuda_oom",
        "collective_timeout",
        "nccl_error",
        "nccl_net_error",
        "nccl_warn",
        "xid",
        "gpu_fallen_off_bus",
        "host_oom_kill",
    } <= expected
    silent = sum(1 for line in CORPUS if not line.expected)
    assert silent > len(CORPUS) // 2


def test_every_real_fault_is_found_and_no_ordinary_line_raises_an_event(matcher: LogMatcher) -> None:
    result = score(matcher, CORPUS)
    assert [(line.file, line.number, event) for line, event in result.false_alarms] == []
    assert [(line.file, line.number, event) for line, event in result.missed] == []


def test_each_excerpt_scanned_whole_gives_the_events_line_by_line(matcher: LogMatcher) -> None:
    by_file: dict[str, list[str]] = {}
    for line in CORPUS:
        by_file.setdefault(line.file, []).append(line.text)
    for name, lines in by_file.items():
        text = "\n".join(lines) + "\n"
        batch = [(m.line_index, m.event, dict(m.labels)) for m in matcher.scan_bytes(text.encode(), line_numbers=True)]
        single = [(i, m.event, dict(m.labels)) for i, t in enumerate(lines) for m in matcher.match_line(t)]
        assert batch == single, name


@pytest.mark.parametrize(
    ("line", "labels"),
    [
        (
            "May 15 23:09:30 host kernel: [  518.061172] Out of memory: Killed process 15925 ((resolved)) "
            "total-vm:168424kB, anon-rss:4064kB",
            {"pid": "15925", "comm": "(resolved)"},
        ),
        (
            "Mar  2 17:35:10 server1 kernel: [2858609.598568] Killed process 11726, UID 498, (mysqld) "
            "total-vm:7823732kB",
            {"pid": "11726", "comm": "mysqld"},
        ),
        ("Killed process 4242 (Web Content) total-vm:1234kB", {"pid": "4242", "comm": "Web Content"}),
    ],
)
def test_oom_kill_names_with_parentheses_and_the_old_uid_form_keep_their_labels(
    line: str, labels: dict[str, str]
) -> None:
    [m] = LogMatcher(Catalogue.load()).match_line(line)
    assert (m.event, dict(m.labels)) == ("host_oom_kill", labels)


def test_nccl_socket_failure_labels_name_the_peer_and_the_reason() -> None:
    line = (
        "[2025-11-24 11:20:21] gpu-server320 [5] misc/socket.cc:46 NCCL WARN socketProgressOpt: Call to send to "
        "10.44.137.149<52905> failed : Connection reset by peer"
    )
    got = {m.event: dict(m.labels) for m in LogMatcher(Catalogue.load()).match_line(line)}
    assert got["nccl_net_error"] == {
        "transport": "Socket",
        "peer": "10.44.137.149<52905>",
        "reason": "Connection reset by peer",
    }
    assert got["nccl_warn"] == {"host": "gpu-server320", "cuda_dev": "5"}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("RuntimeError: NCCL Error 1: unhandled cuda error", "unhandled_cuda_error"),
        ("RuntimeError: NCCL Error 2: unhandled system error", "system_error"),
        ("RuntimeError: NCCL Error 6: remote process exited or there was a network error", "remote_error"),
        ("RuntimeError: NCCL Error 9: something new", "other"),
    ],
)
def test_numeric_nccl_error_codes_map_to_the_named_codes(line: str, code: str) -> None:
    [m] = LogMatcher(Catalogue.load()).match_line(line)
    assert (m.event, m.labels["code"]) == ("nccl_error", code)


# -- hostile lines (issue 15, F9) ----------------------------------------------------------

PROMPTS = [
    # A request logged by vLLM, its prompt quoting an error: text about a fault, not a fault.
    "INFO 05-05 06:16:47 [logger.py:39] Received request chatcmpl-1: prompt: 'Why do I get torch.OutOfMemoryError: "
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79 GiB?', "
    "params: SamplingParams(n=1)",
    "INFO 05-05 06:16:47 [logger.py:39] Received request cmpl-2: prompt: 'RuntimeError: CUDA error: out of memory\\n"
    "NVRM: Xid (PCI:0000:3b:00): 79, pid=1, name=x, GPU has fallen off the bus.\\nnode:1:1 [0] NCCL WARN x'",
    'INFO:     127.0.0.1:5000 - "POST /v1/completions?q=EngineCore%20encountered%20a%20fatal%20error HTTP/1.1" 200 OK',
    "[2026-05-05 06:16:47] Receive: obj=GenerateReqInput(text='Engine core proc EngineCore_DP0 died unexpectedly')",
    'DEBUG 05-05 06:16:47 [api_server.py:1] request body: {"prompt": "Out of memory: Killed process 1 (python3) '
    'total-vm:1kB"}',
]


@pytest.mark.parametrize("line", PROMPTS)
def test_a_logged_prompt_that_quotes_a_fault_is_not_an_event(line: str) -> None:
    assert LogMatcher(Catalogue.load()).match_line(line) == []


@pytest.mark.parametrize(
    "line",
    [
        "NCCL WARN " * 8000,  # froze the daemon 52 s with the backtracking patterns
        "[rank0]:" * 20000 + " Watchdog",
        "(" * 50000 + "NVRM: Xid (",
        "node-01:1:1 [3] NCCL WARN " + "NET/IB : " * 20000,
        "torch.OutOfMemoryError: CUDA out of memory. " + "GPU " * 40000,
        "Killed process 1 (" + "(" * 60000,
    ],
)
def test_hostile_long_lines_are_matched_in_linear_time(line: str) -> None:
    matcher = LogMatcher(Catalogue.load())
    data = (line * 10 + "\n").encode()  # ~1 MB, the default line cap
    started = time.perf_counter()
    matcher.scan_bytes(data)
    matcher.match_line(line * 10)
    # Linear time puts this in milliseconds; the backtracking catalogue needed minutes on a tenth of it.
    assert time.perf_counter() - started < 10.0
