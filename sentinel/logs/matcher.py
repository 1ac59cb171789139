"""Runs the catalogue over text, fast: a substring prefilter, then regexes on hits only.

Logs of a serving fleet are almost all NCCL INFO and request lines; events are rare.
So the matcher first looks for each pattern's keywords over a whole batch of lines
with `str.find` (a C loop over memory, gigabytes per second), and runs the regexes
only on the few lines where a keyword landed. A pattern without keywords uses its own
regex over the batch as its filter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import AnyStr

from sentinel.logs.patterns import Catalogue, Pattern

__all__ = ["Match", "Matcher"]


@dataclass(frozen=True)
class Match:
    """One event found in one line."""

    event: str
    labels: Mapping[str, str]
    value: float | None
    line: str
    line_index: int
    """0-based line number within the scanned text (only counted when asked)."""


class Matcher:
    """Applies a `Catalogue` to a line or a batch of lines. Thread-safe (no mutable state)."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self._patterns = catalogue.patterns
        keyword_masks: dict[str, int] = {}
        bare: list[tuple[re.Pattern[str], int]] = []
        for i, pattern in enumerate(self._patterns):
            if pattern.keywords:
                for keyword in pattern.keywords:
                    keyword_masks[keyword] = keyword_masks.get(keyword, 0) | (1 << i)
            else:
                # As a batch filter, the regex must see line starts and ends inside the batch.
                bare.append((re.compile(pattern.regex.pattern, pattern.regex.flags | re.MULTILINE), 1 << i))
        self._keywords = tuple(keyword_masks.items())
        self._keywords_b = tuple((k.encode(), bits) for k, bits in self._keywords)
        self._bare = tuple(bare)

    def match_line(self, line: str) -> list[Match]:
        """Events in one line (without its newline)."""
        mask = 0
        for keyword, bits in self._keywords:
            if keyword in line:
                mask |= bits
        for regex, bits in self._bare:
            if regex.search(line):
                mask |= bits
        return self._run(line, mask, 0) if mask else []

    def scan(self, text: str, *, line_numbers: bool = False) -> list[Match]:
        """Events in a batch of newline-separated lines, in line order.

        `line_numbers` fills `Match.line_index`; it costs one extra pass over the text.
        """
        hits = _keyword_hits(text, self._keywords, "\n")
        for regex, bits in self._bare:
            pos = 0
            while (m := regex.search(text, pos)) is not None:
                start = text.rfind("\n", 0, m.start()) + 1
                hits[start] = hits.get(start, 0) | bits
                end = text.find("\n", m.start())
                if end < 0:
                    break
                pos = end + 1
        out: list[Match] = []
        index, counted_to = 0, 0
        for start in sorted(hits):
            end = text.find("\n", start)
            if end < 0:
                end = len(text)
            if line_numbers:
                index += text.count("\n", counted_to, start)
                counted_to = start
            out.extend(self._run(text[start:end], hits[start], index))
        return out

    def scan_bytes(self, data: bytes, *, line_numbers: bool = False) -> list[Match]:
        """`scan(data.decode("utf-8", "replace"))`, decoding only the lines that hit a keyword.

        Keywords are searched in the raw bytes (a valid UTF-8 keyword occurs in the bytes
        exactly where it occurs in the decoded text), which saves decoding a whole batch
        of mostly uninteresting lines.
        """
        if self._bare:  # a keyword-less pattern needs the whole text
            return self.scan(data.decode("utf-8", "replace"), line_numbers=line_numbers)
        hits = _keyword_hits(data, self._keywords_b, b"\n")
        out: list[Match] = []
        index, counted_to = 0, 0
        for start in sorted(hits):
            end = data.find(b"\n", start)
            if end < 0:
                end = len(data)
            if line_numbers:
                index += data.count(b"\n", counted_to, start)
                counted_to = start
            out.extend(self._run(data[start:end].decode("utf-8", "replace"), hits[start], index))
        return out

    def _run(self, line: str, mask: int, index: int) -> list[Match]:
        if line.endswith("\r"):  # CRLF logs: a pattern's `$` must still see the line's end
            line = line[:-1]
        out: list[Match] = []
        seen: set[str] = set()
        patterns: tuple[Pattern, ...] = self._patterns
        i = 0
        while mask:
            if mask & 1:
                pattern = patterns[i]
                if pattern.id not in seen:
                    m = pattern.regex.search(line)
                    if m is not None:
                        seen.add(pattern.id)
                        labels, value = pattern.extract(m)
                        out.append(Match(pattern.id, labels, value, line, index))
            mask >>= 1
            i += 1
        return out


def _keyword_hits(text: AnyStr, keywords: Sequence[tuple[AnyStr, int]], newline: AnyStr) -> dict[int, int]:
    """Line start offset -> bitmask of the patterns whose keywords occur in that line."""
    hits: dict[int, int] = {}
    find, rfind = text.find, text.rfind
    for keyword, bits in keywords:
        pos = find(keyword)
        while pos >= 0:
            start = rfind(newline, 0, pos) + 1
            hits[start] = hits.get(start, 0) | bits
            end = find(newline, pos)
            if end < 0:
                break
            pos = find(keyword, end + 1)  # one hit per line is enough
    return hits
