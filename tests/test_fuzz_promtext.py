"""Fuzzing the Prometheus text parser (build item 4): any body ends in a parse or a `ParseError`.

A worker's /metrics is untrusted input. Whatever bytes it serves, the parser returns
`ParsedMetrics` or raises `ParseError` (its `LimitError` included) and nothing else,
and the limits hold on what it returns. Bounded in time: a fixed number of examples,
no deadline per example (the machine may be loaded).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel.collectors.promtext import (
    LimitError,
    ParseError,
    ScrapeLimits,
    TextParser,
    is_reserved_name,
    parse_openmetrics,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = ScrapeLimits(sample_limit=50, label_limit=8, label_name_length_limit=32, label_value_length_limit=64)

# Pieces of the exposition grammar, so random text reaches deep into the parser.
_TOKENS = st.sampled_from(
    [
        "vllm:x", "sentinel_probe_cuda_ooms_total", "ALERTS", "a_b", "_", ":", "{", "}", "=", ",", '"', "\\",
        "\\n", '\\"', " ", "\t", "\n", "#", "# HELP ", "# TYPE ", "1", "-1", "1e3", "NaN", "+Inf", "-Inf",
        "0x1", "1_000", "worker", "le", "__name__", "é", "\x00", "\r", "1700000000000",
    ]
)  # fmt: skip
_BODIES = st.lists(_TOKENS, max_size=60).map("".join) | st.text(max_size=300)


_NAMES = st.sampled_from(["vllm:num_requests_running", "sentinel_gpu_up", "ALERTS", "x", "a:b_c", "_"])
_LABEL_NAMES = st.sampled_from(["worker", "gpu", "le", "model_name", "a" * 40, "__meta", "exported_worker", "x"])
_LABEL_VALUES = st.sampled_from(["", "0", "Qwen/Qwen3", "v" * 70, 'a"b', "a\\b", "line\nbreak", "é", "}"])


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@st.composite
def valid_bodies(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 60))):
        labels = draw(st.dictionaries(_LABEL_NAMES, _LABEL_VALUES, max_size=9))
        block = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        value = draw(st.sampled_from(["1", "0.5", "NaN", "+Inf", "-3e-9"]))
        lines.append(f"{draw(_NAMES)}{{{block}}} {value}\n")
    return "".join(lines)


@FUZZ
@given(_BODIES)
def test_random_text_parses_or_raises_parse_error(body: str) -> None:
    try:
        parsed = TextParser({"worker": "w0"}, limits=LIMITS).parse(body)
    except ParseError:
        return
    assert len(parsed.samples) <= LIMITS.sample_limit


@FUZZ
@given(valid_bodies())
def test_well_formed_bodies_respect_the_limits_and_never_keep_a_reserved_name(body: str) -> None:
    try:
        parsed = TextParser({"worker": "w0"}, limits=LIMITS).parse(body)
    except LimitError as exc:
        assert exc.reason in ("sample_limit", "label_limit")
        return
    except ParseError:
        return  # a drawn name may be a duplicate label after relabelling, etc.
    assert len(parsed.samples) <= LIMITS.sample_limit
    for labels in parsed.samples:
        assert len(labels) <= LIMITS.label_limit
        names = dict(labels)
        assert names["worker"] == "w0"
        assert not is_reserved_name(names["__name__"])


@FUZZ
@given(_BODIES | valid_bodies().map(lambda b: "# TYPE x gauge\n" + b + "# EOF\n"))
def test_openmetrics_bodies_parse_or_raise_parse_error(body: str) -> None:
    try:
        parse_openmetrics(body, {"worker": "w0"}, limits=LIMITS)
    except ParseError:
        return


@FUZZ
@given(st.binary(max_size=400))
def test_undecodable_bytes_are_an_encoding_error_in_the_collector(raw: bytes) -> None:
    from sentinel.collectors.endpoint import EndpointCollector, ScrapeError
    from sentinel.collectors.http import SharedHttpSession
    from sentinel.config.models import EndpointCollectorConfig, WorkerConfig
    from sentinel.store import Store

    collector = EndpointCollector(
        WorkerConfig(name="w0", endpoint="http://127.0.0.1:1"),
        EndpointCollectorConfig(),
        SharedHttpSession(),
        Store(),
    )
    try:
        collector.parse_body(raw, "text/plain; version=0.0.4")
    except ScrapeError as exc:
        assert exc.reason in ("encoding", "parse", "sample_limit", "label_limit")
