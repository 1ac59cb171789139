"""The pattern catalogue against every line form of shared/reference/FORMATS.md, and fuzzing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.config.models import LogPattern
from sentinel.logs import BUILTIN_EVENTS, Catalogue, CatalogueError, Matcher, normalise_pci_bus_id

MATCHER = Matcher(Catalogue.load())

WARN_PREFIX = "[2026-05-05 06:16:47] node-01:189884:189884 [3] transport/net_ib.cc:1297 NCCL WARN "
TORCH_PREFIX = "[rank5]:[E202 12:25:57.436 ProcessGroupNCCL.cpp:697] [PG ID 0 PG GUID 0(default_pg) Rank 5] "

# line -> {event: (labels that must be present, value)}; other events must not appear.
POSITIVE: list[tuple[str, dict[str, tuple[dict[str, str], float | None]]]] = [
    # -- NCCL
    (
        "[2026-05-05 06:16:47] node-01:189884:189884 [3] plugin/net.cc:334 NCCL WARN "
        "Failed to initialize any NET plugin",
        {"nccl_warn": ({"host": "node-01", "cuda_dev": "3"}, None), "nccl_net_error": ({}, None)},
    ),
    ("node-01:189884:189884 [3] NCCL WARN Unexpected state", {"nccl_warn": ({"host": "node-01"}, None)}),
    (
        WARN_PREFIX + "Cuda failure 'out of memory'",
        {
            "nccl_warn": ({}, None),
            "nccl_cuda_failure": ({"error": "out of memory"}, None),
            "cuda_oom": ({"reason": "nccl"}, None),
        },
    ),
    (
        WARN_PREFIX + "Cuda failure 2 'out of memory'",
        {
            "nccl_warn": ({}, None),
            "nccl_cuda_failure": ({"error": "out of memory", "cuda_code": "2"}, None),
            "cuda_oom": ({"reason": "nccl"}, None),
        },
    ),
    (
        WARN_PREFIX + "Cuda failure 'an illegal memory access was encountered'",
        {"nccl_warn": ({}, None), "nccl_cuda_failure": ({"error": "an illegal memory access was encountered"}, None)},
    ),
    (
        WARN_PREFIX + "NET/IB: Got completion from peer 10.0.0.2<5012> with status=12(transport retry counter exceeded)"
        " opcode=0 len=0 vendor err 129 (Recv) localGid ::ffff:10.0.0.1 remoteGid ::ffff:10.0.0.2",
        {
            "nccl_warn": ({}, None),
            "nccl_net_error": ({"transport": "IB", "peer": "10.0.0.2<5012>", "status": "12"}, None),
        },
    ),
    (
        WARN_PREFIX + "NET/IB : Got completion from peer 10.0.0.2<5012> with error 12, opcode 0, len 0, vendor err 129",
        {"nccl_warn": ({}, None), "nccl_net_error": ({"transport": "IB", "status": "12"}, None)},
    ),
    (
        WARN_PREFIX + "NET/IB : mlx5_0:1 Got non-fatal async event: port error(10)",
        {"nccl_warn": ({}, None), "nccl_net_error": ({"transport": "IB"}, None)},
    ),
    (
        WARN_PREFIX + "Call to ibv_poll_cq() returned -1",
        {"nccl_warn": ({}, None), "nccl_net_error": ({}, None)},
    ),
    (
        "NCCL error in: /opt/pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, unhandled system error "
        "(run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5",
        {"nccl_error": ({"code": "system_error"}, None)},
    ),
    (
        "torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, "
        "unhandled cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.20.5",
        {"nccl_error": ({"code": "unhandled_cuda_error"}, None)},
    ),
    (
        "RuntimeError: NCCL error: internal error - please report this issue to the NCCL developers",
        {"nccl_error": ({"code": "internal_error"}, None)},
    ),
    (
        "RuntimeError: NCCL error: invalid argument (run with NCCL_DEBUG=WARN for details)",
        {"nccl_error": ({"code": "invalid_argument"}, None)},
    ),
    (
        "RuntimeError: NCCL error: invalid usage (run with NCCL_DEBUG=WARN for details)",
        {"nccl_error": ({"code": "invalid_usage"}, None)},
    ),
    (
        "NCCL error in: /x/ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error, "
        "NCCL version 2.21.5",
        {"nccl_error": ({"code": "remote_error"}, None)},
    ),
    ("RuntimeError: NCCL error: timeout", {"nccl_error": ({"code": "timeout"}, None)}),
    ("RuntimeError: NCCL error: something new", {"nccl_error": ({"code": "other"}, None)}),
    # -- PyTorch watchdog
    (
        TORCH_PREFIX + "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE, "
        "NumelIn=1024, NumelOut=1024, Timeout(ms)=600000) ran for 600081 milliseconds before timing out.",
        {"collective_timeout": ({"op": "ALLREDUCE", "timeout_ms": "600000", "rank": "5"}, 600081.0)},
    ),
    (
        "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1, OpType=ALLGATHER, "
        "Timeout(ms)=1800000) ran for 1800602 milliseconds before timing out.",
        {"collective_timeout": ({"op": "ALLGATHER", "timeout_ms": "1800000", "rank": "0"}, 1800602.0)},
    ),
    (
        "[PG 0 Rank 5] Watchdog caught collective operation timeout: WorkNCCL(OpType=BROADCAST, Timeout(ms)=600000)",
        {"collective_timeout": ({"op": "BROADCAST", "timeout_ms": "600000"}, None)},
    ),
    (
        TORCH_PREFIX + "ProcessGroupNCCL's watchdog got stuck for 480 seconds without making progress in monitoring "
        "enqueued collectives.",
        {"watchdog_stuck": ({}, 480.0)},
    ),
    (
        "[rank0]:[E ProcessGroupNCCL.cpp:1316] [PG 0 Rank 0] Heartbeat monitor timed out! Process will be terminated "
        "after dumping debug info. workMetaList_.size()=1",
        {"watchdog_stuck": ({}, None)},
    ),
    (
        TORCH_PREFIX + "To avoid data inconsistency, we are taking the entire process down.",
        {"process_group_abort": ({}, None)},
    ),
    # -- CUDA OOM, every PyTorch generation
    (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
        "79.19 GiB of which 5.06 MiB is free. Including non-PyTorch memory, this process has 79.17 GiB memory in use. "
        "Of the allocated memory 77.50 GiB is allocated by PyTorch, and 1.02 GiB is reserved by PyTorch but "
        "unallocated.",
        {"cuda_oom": ({"gpu": "0", "reason": "allocator"}, None)},
    ),
    (
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 3 has a total capacity of "
        "79.19 GiB of which 1.06 GiB is free.",
        {"cuda_oom": ({"gpu": "3"}, None)},
    ),
    (
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 1; 79.19 GiB total capacity; 75.00 GiB "
        "already allocated; 1.06 GiB free; 77.00 GiB reserved in total by PyTorch) If reserved memory is >> allocated "
        "memory try setting max_split_size_mb to avoid fragmentation.",
        {"cuda_oom": ({"gpu": "1", "reason": "allocator"}, None)},
    ),
    (
        "torch.OutOfMemoryError: CUDA out of memory. Allocation was preemptively rejected because it would exceed "
        "per_process_memory_fraction limit.",
        {"cuda_oom": ({"reason": "memory_fraction"}, None)},
    ),
    ("RuntimeError: CUDA error: out of memory", {"cuda_oom": ({"reason": "runtime"}, None)}),
    # -- engines
    ("ERROR 05-05 06:16:47 [core.py:700] EngineCore encountered a fatal error.", {"engine_dead": ({}, None)}),
    (
        "ERROR 05-05 06:16:48 [core_client.py:564] Engine core proc EngineCore_DP0 died unexpectedly, "
        "shutting down client.",
        {"engine_dead": ({"engine": "EngineCore_DP0"}, None)},
    ),
    (
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the "
        "root cause.",
        {"engine_dead": ({}, None)},
    ),
    (
        "[2026-05-05 06:16:47] Received sigquit from a child process. It usually means the child failed.",
        {"engine_dead": ({}, None)},
    ),
    (
        "[2026-05-05 06:16:47] Health check failed. Server couldn't get a response from detokenizer for last "
        "20 seconds.",
        {"health_check_failed": ({"component": "detokenizer"}, 20.0)},
    ),
    # -- expert load
    (
        "INFO 05-05 06:16:47 [eplb_state.py:400] EPLB step: 1200 for model Qwen/Qwen3-30B-A3B: avg_tokens=512.00, "
        "max_tokens=730, balancedness=0.7014, steps until the next rearrangement: 1800",
        {"expert_balancedness": ({"model": "Qwen/Qwen3-30B-A3B"}, 0.7014)},
    ),
    (
        "INFO 05-05 06:16:47 [eplb_state.py:400] EPLB step: avg_tokens=512.00, max_tokens=730, balancedness=0.7014",
        {"expert_balancedness": ({}, 0.7014)},
    ),
    (
        "[Expert Balancedness] forward_pass_id=42 current_pass_balancedness=0.812 last_10_average_balancedness=0.800 "
        "last_100_average_balancedness=0.790 last_1000_average_balancedness=0.785  gpu_physical_count_sum=8192",
        {"expert_balancedness": ({}, 0.812)},
    ),
    # -- kernel
    (
        "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, GPU has fallen off the bus.",
        {
            "xid": ({"xid": "79", "pci_bus_id": "0000:3b:00.0"}, 79.0),
            "gpu_fallen_off_bus": ({"pci_bus_id": "0000:3b:00.0"}, None),
        },
    ),
    (
        "NVRM: Xid (PCI:0000:3b:00): 48, pid='<unknown>', name=<unknown>, An uncorrectable double bit error (DBE) has "
        "been detected on GPU in the framebuffer at partition 2, subpartition 0.",
        {"xid": ({"xid": "48", "pci_bus_id": "0000:3b:00.0"}, 48.0)},
    ),
    (
        "[ 1234.567890] NVRM: Xid (PCI:0000:3B:00.0): 13, pid=99, name=python3, Graphics Exception",
        {"xid": ({"xid": "13", "pci_bus_id": "0000:3b:00.0"}, 13.0)},
    ),
    (
        "NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.",
        {"gpu_fallen_off_bus": ({"pci_bus_id": "0000:3b:00.0"}, None)},
    ),
    (
        "NVRM: GPU at PCI:0000:3b:00: GPU has fallen off the bus.",
        {"gpu_fallen_off_bus": ({"pci_bus_id": "0000:3b:00.0"}, None)},
    ),
    (
        "Out of memory: Killed process 4242 (python3) total-vm:81234567kB, anon-rss:7654321kB, file-rss:0kB",
        {"host_oom_kill": ({"pid": "4242", "comm": "python3"}, None)},
    ),
    (
        "Memory cgroup out of memory: Killed process 4242 (python3) total-vm:81234567kB, anon-rss:7654321kB",
        {"host_oom_kill": ({"pid": "4242", "comm": "python3"}, None)},
    ),
    (
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
        "oom_memcg=/system.slice/vllm.service,task_memcg=/system.slice/vllm.service,task=python3,pid=4242,uid=0",
        {
            "host_oom_constraint": (
                {"constraint": "CONSTRAINT_MEMCG", "oom_memcg": "/system.slice/vllm.service", "task": "python3"},
                None,
            )
        },
    ),
]

NEGATIVE = [
    "KV cache memory usage 40%",
    "Loading weights took 12 GiB memory",
    "INFO 05-05 06:16:47 [gpu_worker.py:227] Available KV cache memory: 12.50 GiB",
    "INFO 05-05 06:16:47 [worker.py:267] Memory profiling takes 5.21 seconds; the current vLLM instance can use "
    "total_gpu_memory (79.19GiB) x gpu_memory_utilization (0.90) = 71.27GiB; model weights take 56.30GiB; "
    "non_torch_memory takes 0.20GiB; PyTorch activation peak memory takes 1.20GiB",
    "INFO 05-05 06:16:47 [loggers.py:123] Engine 000: Avg prompt throughput: 12.3 tokens/s, Avg generation throughput: "
    "45.6 tokens/s, Running: 3 reqs, Waiting: 0 reqs, GPU KV cache usage: 7.1%, Prefix cache hit rate: 0.0%",
    "node-01:189884:189901 [3] NCCL INFO Channel 00/0 : 3[3] -> 4[4] via P2P/IPC/read",
    "node-01:189884:189901 [3] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB ; OOB eth0:10.0.0.1<0>",
    "node-01:189884:189901 [3] NCCL INFO NCCL_IB_TIMEOUT set by environment to 22.",
    "node-01:189884:189901 [3] NCCL INFO comm 0x5581 rank 3 nranks 8 cudaDev 3 busId 3b000 - Init COMPLETE",
    "node-01:189884:189901 [3] NCCL INFO Using network IB",
    "If out of memory errors occur, reduce --max-num-seqs",
    "except torch.cuda.OutOfMemoryError:",
    "NVRM: GPU at PCI:0000:3b:00: GPU-7f3c9a52-1111-2222-3333-444455556666",
    "NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.54.15",
    "python3 invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0, oom_score_adj=0",
    "[rank0]:[E ProcessGroupNCCL.cpp:1537] [PG 0 Rank 0] Timeout at NCCL work: 7, last enqueued NCCL work: 7, last "
    "completed NCCL work: 6.",
    'INFO:     127.0.0.1:52346 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
    "",
]

# The same fault repeated by PyTorch in an exception's text must not count twice.
REPEATS = [
    "[rank0]:[E ProcessGroupNCCL.cpp:1414] [PG 0 Rank 0] Process group watchdog thread terminated with exception: "
    "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE, Timeout(ms)=600000) "
    "ran for 600010 milliseconds before timing out.",
    "  what():  [PG 0 Rank 0] Process group watchdog thread terminated with exception: [Rank 0] Watchdog caught "
    "collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE, Timeout(ms)=600000) ran for 600010 "
    "milliseconds before timing out.",
    "  what():  NCCL error: unhandled system error (run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5",
    "NET/IB : Got completion from peer 10.1.1.2<33546> with status=12 opcode=0 len=0 vendor err 129 (Recv)",
    "Cuda failure 'out of memory'",
]


def _events(line: str) -> dict[str, tuple[dict[str, str], float | None]]:
    out = {}
    for m in MATCHER.match_line(line):
        assert m.event not in out, f"{m.event} twice on one line"
        out[m.event] = (dict(m.labels), m.value)
    return out


@pytest.mark.parametrize(
    ("line", "expected"), POSITIVE, ids=[f"{i}:{next(iter(e))}" for i, (_, e) in enumerate(POSITIVE)]
)
def test_formats_line_forms_match_the_right_events_with_labels_and_values(
    line: str, expected: dict[str, tuple[dict[str, str], float | None]]
) -> None:
    got = _events(line)
    assert set(got) == set(expected), line
    for event, (labels, value) in expected.items():
        got_labels, got_value = got[event]
        assert labels.items() <= got_labels.items(), (event, got_labels)
        assert got_value == pytest.approx(value) if value is not None else got_value is None


@pytest.mark.parametrize("line", NEGATIVE)
def test_ordinary_lines_that_mention_memory_or_nccl_match_nothing(line: str) -> None:
    assert _events(line) == {}


@pytest.mark.parametrize("line", REPEATS)
def test_repeated_fault_text_in_exceptions_does_not_count_again(line: str) -> None:
    got = _events(line)
    assert not {"collective_timeout", "nccl_error", "nccl_net_error", "nccl_cuda_failure", "cuda_oom"} & set(got)


def test_every_builtin_event_id_is_produced_by_some_formats_line() -> None:
    produced = {event for _, expected in POSITIVE for event in expected}
    assert set(BUILTIN_EVENTS) <= produced
    assert set(BUILTIN_EVENTS) <= set(MATCHER.catalogue.event_ids)


def test_every_positive_line_contains_a_keyword_of_each_entry_whose_regex_matches_it() -> None:
    # The prefilter skips lines without a keyword: a keyword list that misses a form would lose events.
    for line, _ in POSITIVE:
        for pattern in MATCHER.catalogue.patterns:
            if pattern.regex.search(line):
                assert any(k in line for k in pattern.keywords), (pattern.id, line)


def test_batch_scan_finds_the_same_events_as_line_by_line_with_line_numbers() -> None:
    lines = [line for line, _ in POSITIVE] + NEGATIVE
    text = "\n".join(lines) + "\n"
    batch = [(m.line_index, m.event, dict(m.labels), m.value) for m in MATCHER.scan(text, line_numbers=True)]
    single = [(i, m.event, dict(m.labels), m.value) for i, line in enumerate(lines) for m in MATCHER.match_line(line)]
    assert batch == single


def test_crlf_lines_match_like_lf_lines() -> None:
    assert [m.event for m in MATCHER.scan("RuntimeError: CUDA error: out of memory\r\n")] == ["cuda_oom"]


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("0000:3b:00", "0000:3b:00.0"),
        ("0000:3b:00.0", "0000:3b:00.0"),
        ("PCI:0000:3B:00", "0000:3b:00.0"),
        ("00000000:3B:00.0", "0000:3b:00.0"),
        ("3b:00.1", "0000:3b:00.1"),
    ],
)
def test_pci_bus_ids_are_normalised_to_sysfs_form(raw: str, normal: str) -> None:
    assert normalise_pci_bus_id(raw) == normal


def test_config_patterns_extend_the_catalogue_and_work_without_keywords() -> None:
    extra = LogPattern(
        id="my_event", regex=r"^custom failure code=(?P<code>\d+)$", labels={"code": "code"}, value="code"
    )
    matcher = Matcher(Catalogue.load([extra]))
    text = "noise\ncustom failure code=7\nmore noise\nprefix custom failure code=8\n"
    got = [(m.event, dict(m.labels), m.value, m.line_index) for m in matcher.scan(text, line_numbers=True)]
    assert got == [("my_event", {"code": "7"}, 7.0, 1)]


def test_config_pattern_with_a_literal_label() -> None:
    extra = LogPattern(id="disk_full", regex=r"No space left on device", labels={"severity": "=critical"})
    [m] = Matcher(Catalogue.load([extra])).match_line("OSError: [Errno 28] No space left on device")
    assert (m.event, dict(m.labels)) == ("disk_full", {"severity": "critical"})


def test_catalogue_errors_name_the_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("patterns:\n  - id: x\n    regex: 'a(?P<g>b)'\n    labels: {l: nope}\n")
    with pytest.raises(CatalogueError, match=r"bad.yaml: patterns.0.labels.l: the regex has no group named 'nope'"):
        Catalogue.load(path=bad)
    bad.write_text("patterns:\n  - id: x\n    regex: 'a('\n")
    with pytest.raises(CatalogueError, match=r"patterns.0.regex: not a valid regular expression"):
        Catalogue.load(path=bad)
    bad.write_text("patterns:\n  - id: x\n    regex: 'a'\n    colour: red\n")
    with pytest.raises(CatalogueError, match=r"patterns.0.colour: unknown key"):
        Catalogue.load(path=bad)


def test_builtin_catalogue_entries_all_have_keywords() -> None:
    assert all(p.keywords for p in MATCHER.catalogue.patterns)


_FRAGMENTS = st.sampled_from(
    [line for line, _ in POSITIVE[:12]] + NEGATIVE[:6] + ["NCCL WARN", "out of memory", "NVRM: Xid (", "\n", "\r"]
)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_matcher_never_raises_on_arbitrary_text(text: str) -> None:
    MATCHER.scan(text, line_numbers=True)
    for line in text.split("\n"):
        MATCHER.match_line(line)


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_matcher_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    MATCHER.scan(data.decode("utf-8", "replace"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_FRAGMENTS, st.text(max_size=30)), max_size=20))
def test_batch_scan_equals_line_by_line_on_mixed_text(parts: list[str]) -> None:
    text = "".join(parts)
    lines = text.split("\n")
    batch = [(m.line_index, m.event, dict(m.labels), m.value) for m in MATCHER.scan(text, line_numbers=True)]
    single = [(i, m.event, dict(m.labels), m.value) for i, line in enumerate(lines) for m in MATCHER.match_line(line)]
    assert batch == single


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_FRAGMENTS.map(str.encode), st.binary(max_size=30)), max_size=20))
def test_byte_scan_equals_scan_of_the_decoded_text(parts: list[bytes]) -> None:
    data = b"".join(parts)
    as_bytes = [
        (m.line_index, m.event, dict(m.labels), m.value, m.line) for m in MATCHER.scan_bytes(data, line_numbers=True)
    ]
    decoded = data.decode("utf-8", "replace")
    as_text = [
        (m.line_index, m.event, dict(m.labels), m.value, m.line) for m in MATCHER.scan(decoded, line_numbers=True)
    ]
    assert as_bytes == as_text
