"""Line splitting with a length bound, the offsets file, and the pipeline's handling of bad bytes."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.logs import Catalogue, LogMatcher
from sentinel.logs.lines import LineSplitter
from sentinel.logs.matcher import Match
from sentinel.logs.offsets import FileOffset, OffsetStore
from sentinel.logs.pipeline import SourcePipeline


def test_partial_last_line_waits_for_its_newline() -> None:
    s = LineSplitter(100)
    assert s.feed(b"one\ntw") == (b"one\n", 0)
    assert s.carry == b"tw"
    assert s.feed(b"o") == (b"", 0)
    assert s.feed(b"\nthree\n") == (b"two\nthree\n", 0)
    assert s.carry == b""


def test_over_long_line_is_cut_counted_and_its_rest_dropped() -> None:
    s = LineSplitter(4)
    assert s.feed(b"ab\ncdefghij\nk") == (b"ab\ncdef\n", 1)
    # An over-long partial line is cut as soon as it passes the limit, then dropped to its newline.
    assert s.feed(b"lmnop") == (b"klmn\n", 1)
    assert s.discarding
    assert s.feed(b"qrs") == (b"", 0)
    assert s.feed(b"tu\nvw\n") == (b"vw\n", 0)
    assert not s.discarding


def _reference(data: bytes, limit: int) -> tuple[list[bytes], int, bytes]:
    """Line-by-line model of the splitter: complete lines (cut), cut count, leftover."""
    *lines, rest = data.split(b"\n")
    out, cut = [], 0
    for line in lines:
        if len(line) > limit:
            out.append(line[:limit])
            cut += 1
        else:
            out.append(line)
    return out, cut, rest


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30), st.integers(1, 12), st.data()
)
def test_splitter_matches_a_line_by_line_model_for_any_chunking(
    lines: list[bytes], limit: int, data: st.DataObject
) -> None:
    stream = b"\n".join(lines) + b"\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    s = LineSplitter(limit)
    got, cut, prev = b"", 0, 0
    for c in [*cuts, len(stream)]:
        block, n = s.feed(stream[prev:c])
        got += block
        cut += n
        prev = c
    expected, expected_cut, _ = _reference(stream, limit)
    assert got.split(b"\n")[:-1] == expected
    assert cut == expected_cut


def test_offsets_survive_a_reload_and_the_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state" / "log_offsets.json"
    store = OffsetStore(path)
    store.watch_sources({"file:w:/x/*.log"})
    store.set_file(FileOffset("file:w:/x/*.log", "/x/a.log", 1, 2, 300))
    store.set_cursor("journal:w:vllm.service", "s=abc;i=1")
    assert store.persist()
    assert not list(path.parent.glob(".log_offsets.json.*")), "temp file left behind"
    again = OffsetStore.load(path)
    assert again.loaded
    assert again.file("file:w:/x/*.log", 1, 2) == FileOffset("file:w:/x/*.log", "/x/a.log", 1, 2, 300)
    assert again.cursor("journal:w:vllm.service") == "s=abc;i=1"
    assert again.previous_sources == {"file:w:/x/*.log"}


def test_offsets_are_written_at_most_once_per_interval(tmp_path: Path) -> None:
    now = [100.0]
    store = OffsetStore(tmp_path / "o.json", min_interval_s=1.0, clock=lambda: now[0])
    store.set_cursor("a", "1")
    assert store.maybe_persist()
    store.set_cursor("a", "2")
    assert not store.maybe_persist()
    now[0] += 1.5
    assert store.maybe_persist()
    assert json.loads((tmp_path / "o.json").read_text())["cursors"] == {"a": "2"}


def test_corrupt_offsets_file_is_set_aside_and_reading_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "log_offsets.json"
    path.write_text("{not json")
    store = OffsetStore.load(path)
    assert not store.loaded
    assert (tmp_path / "log_offsets.json.bad").exists()


class _Collect:
    def __init__(self) -> None:
        self.matches: list[Match] = []

    def __call__(self, pipeline: SourcePipeline, matches: list[Match], ts: int) -> None:
        self.matches.extend(matches)


def test_non_utf8_and_nul_bytes_are_replaced_counted_and_still_matched() -> None:
    got = _Collect()
    p = SourcePipeline("w", "src", LogMatcher(Catalogue.load()), got)
    # The event is the line's own message; the broken bytes trail it (an event in the middle of
    # a line is text that mentions a fault, not one: see the catalogue's anchoring).
    p.feed(b"ok line\nRuntimeError: CUDA error: out of memory \xff\xfe broken\nbin\x00ary\n")
    assert p.stats.lines == 3
    assert p.stats.invalid == 2
    assert [m.event for m in got.matches] == ["cuda_oom"]
    p.feed(b"bin\x00ary again\n")
    assert p.stats.invalid == 3


def test_problems_are_counted_once_per_change_and_cleared_on_recovery() -> None:
    p = SourcePipeline("w", "src", LogMatcher(Catalogue.load()), _Collect())
    for _ in range(3):
        p.problem("/x.log", "cannot open /x.log: Permission denied")
    assert p.stats.read_errors == 1
    p.problem("/x.log", None)
    assert p.problems == {}
    p.problem("/x.log", "/x.log is a directory; skipping it")
    assert p.stats.read_errors == 2


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_pipeline_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    SourcePipeline("w", "src", LogMatcher(Catalogue.load()), _Collect()).feed(data + b"\n")
