"""Runs the catalogue over log text, fast and in linear time.

Logs of a serving fleet are almost all NCCL INFO and request lines; events are rare.
So `LogMatcher` first finds, in one pass over a whole block of lines, the lines that
hold a keyword of some entry (`KeywordScanner`: Hyperscan, or RE2), and runs the
entries' RE2 regexes only on those lines. An entry without keywords (an operator's,
say) uses its own regex over the block as its filter. Every step is linear in the
block's length: no line can stall the reader, whatever it holds.

Text is matched as bytes; only the lines that produce an event are decoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import re2

from sentinel.logs.patterns import Catalogue, Pattern
from sentinel.logs.prefilter import KeywordScanner
from sentinel.logs.regex import Spans

__all__ = ["MATCH_WINDOW_BYTES", "LogMatcher", "Match"]

MATCH_WINDOW_BYTES = 16 * 1024
"""Regexes see at most this much of a line, from its start. Every catalogue entry is
anchored at the line's head and real fault lines are a few hundred bytes (a CUDA OOM
message about 600), so the window loses nothing real, and it bounds the time one line
can hold the interpreter to about a millisecond per entry whatever its length."""


class Match(NamedTuple):
    """One event found in one line (a tuple: cheap to make by the hundred thousand)."""

    event: str
    labels: Mapping[str, str]
    value: float | None
    line: str
    line_index: int
    """0-based line number within the scanned text (only counted when asked)."""


class _BlockFilter:
    """A keyword-less entry's regex over a whole block: lines where it may match."""

    def __init__(self, pattern: Pattern, bit: int) -> None:
        options = re2.Options()
        options.never_nl = True  # a match never spans lines, so each match names one line
        options.never_capture = True  # only where it matches counts here: RE2's DFA alone answers
        options.log_errors = False
        self._regex = re2.compile("(?m)" + pattern.regex.pattern, options)
        self.bit = bit

    def lines(self, data: bytes) -> list[int]:
        starts: list[int] = []
        for m in self._regex.finditer(data):
            start = data.rfind(b"\n", 0, m.start()) + 1
            if not starts or starts[-1] != start:
                starts.append(start)
        return starts


class LogMatcher:
    """Applies a `Catalogue` to a line or a block of lines.

    Thread-safe: the readers share one matcher. RE2 objects are, Hyperscan gets a scratch
    space per thread, and the one shared mutable thing, the cache of plans per keyword
    mask, is only ever filled with equal values.
    """

    def __init__(self, catalogue: Catalogue, *, engine: str = "auto") -> None:
        self.catalogue = catalogue
        self._patterns = catalogue.patterns
        keyword_masks: dict[str, int] = {}
        filters: list[_BlockFilter] = []
        for i, pattern in enumerate(self._patterns):
            if pattern.keywords:
                for keyword in pattern.keywords:
                    keyword_masks[keyword] = keyword_masks.get(keyword, 0) | (1 << i)
            else:
                filters.append(_BlockFilter(pattern, 1 << i))
        self._scanner = KeywordScanner([k.encode() for k in keyword_masks], list(keyword_masks.values()), engine=engine)
        self._filters = tuple(filters)
        self._plans: dict[int, _Plan] = {}

    @property
    def engine(self) -> str:
        """The keyword scanner in use: "hyperscan" or "re2"."""
        return self._scanner.engine

    # -- entry points --------------------------------------------------------------------

    def match_line(self, line: str) -> list[Match]:
        """Events in one line (without its newline)."""
        data = line.encode("utf-8", "surrogatepass")
        mask = 0
        for start, bits in self._candidates(data).items():
            if start == 0:
                mask |= bits
        return self._run(data, 0, len(data), mask, 0, "surrogatepass") if mask else []

    def scan(self, text: str, *, line_numbers: bool = False) -> list[Match]:
        """Events in a block of newline-separated lines, in line order.

        `line_numbers` fills `Match.line_index`; it costs one extra pass over the text.
        """
        return self._scan(text.encode("utf-8", "surrogatepass"), line_numbers, "surrogatepass")

    def scan_bytes(self, data: bytes, *, line_numbers: bool = False, first_line: int = 0) -> list[Match]:
        """`scan(data.decode("utf-8", "replace"))`, decoding only the lines that hold an event.

        With `line_numbers`, `first_line` is the number of the block's first line (a
        reader of many blocks numbers them all without copying each match).
        """
        return self._scan(data, line_numbers, "replace", first_line)

    # -- the work ------------------------------------------------------------------------

    def _candidates(self, data: bytes) -> dict[int, int]:
        hits = self._scanner.scan(data)
        for block_filter in self._filters:
            for start in block_filter.lines(data):
                hits[start] = hits.get(start, 0) | block_filter.bit
        return hits

    def _scan(self, data: bytes, line_numbers: bool, errors: str, first_line: int = 0) -> list[Match]:
        hits = self._candidates(data)
        if not hits:
            return []
        out: list[Match] = []
        index, counted_to = first_line, 0
        find, count, n = data.find, data.count, len(data)
        # The keyword scanners report lines in order; the block filters may add earlier ones.
        for start in sorted(hits) if self._filters else hits:
            end = find(b"\n", start)
            if end < 0:
                end = n
            if line_numbers:
                index += count(b"\n", counted_to, start)
                counted_to = start
            found = self._run(data, start, end, hits[start], index, errors)
            if found:
                out.extend(found)
        return out

    def _plan(self, mask: int) -> _Plan:
        plan = self._plans.get(mask)
        if plan is None:
            if len(self._plans) > 4096:  # masks are few in practice; never let the cache grow without bound
                self._plans.clear()
            plan = self._plans[mask] = _Plan(tuple(p for i, p in enumerate(self._patterns) if mask >> i & 1))
        return plan

    def _run(self, data: bytes, start: int, end: int, mask: int, index: int, errors: str) -> list[Match]:
        if end > start and data[end - 1] == 13:  # CRLF logs: a pattern's end must still see the line's end
            end -= 1
        end = min(end, start + MATCH_WINDOW_BYTES)
        line = data[start:end] if start or end != len(data) else data
        if errors == "replace" and not line.isascii():
            # RE2 reads bytes as UTF-8 and `.` does not match an invalid byte; match the
            # line as it decodes (invalid bytes as U+FFFD), as `scan` of the decoded text does.
            line = line.decode("utf-8", "replace").encode()
        found = self._plan(mask).matches(line)
        if not found:
            return []
        text = line.decode("utf-8", errors)
        if len(found) == 1:
            pattern, spans = found[0]
            labels, value = pattern.extract(line, spans) if spans is not None else (pattern.literal_labels(), None)
            return [Match(pattern.id, labels, value, text, index)]
        out: list[Match] = []
        seen: set[str] = set()
        for pattern, spans in found:
            if pattern.id in seen:
                continue
            seen.add(pattern.id)
            labels, value = pattern.extract(line, spans) if spans is not None else (pattern.literal_labels(), None)
            out.append(Match(pattern.id, labels, value, text, index))
        return out


class _Plan:
    """The entries one keyword mask selects, and how to test them all with few RE2 calls.

    Each RE2 call from Python costs about a microsecond whatever the regex, so a line
    that several entries may match (an NCCL WARN line is a candidate for six) is first
    tested against all of them at once with an RE2 set (one DFA pass, no submatches);
    only the entries that match and extract labels are then run with their groups.
    """

    __slots__ = ("_set", "patterns")

    def __init__(self, patterns: tuple[Pattern, ...]) -> None:
        self.patterns = patterns
        self._set: Any = None
        if len(patterns) > 1:
            options = re2.Options()
            options.max_mem = 64 << 20
            options.log_errors = False
            regex_set = re2.Set.SearchSet(options)
            for pattern in patterns:
                regex_set.Add(pattern.regex.pattern)
            regex_set.Compile()
            self._set = regex_set

    def matches(self, line: bytes) -> list[tuple[Pattern, Spans | None]]:
        """The entries that match `line`, in catalogue order, with their spans when they need them."""
        if self._set is None:
            pattern = self.patterns[0]
            spans = pattern.find_spans(line)
            return [] if spans is None else [(pattern, spans)]
        found = self._set.Match(line)
        if not found:
            return []
        out: list[tuple[Pattern, Spans | None]] = []
        ids: set[str] = set()
        heads: dict[int, bool] = {}
        for i in sorted(found):
            pattern = self.patterns[i]
            if pattern.id in ids:
                continue  # the first entry of an id that matches wins: no need to extract the others
            ids.add(pattern.id)
            out.append((pattern, pattern.find_spans(line, heads) if pattern.needs_spans else None))
        return out
