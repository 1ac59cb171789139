"""One pass over a block of log lines finds the lines worth a regex: a multi-keyword scan.

Each catalogue entry names literal keywords, one of which is in every line it matches.
The scanner looks for all of them at once and answers, per line start, a bitmask of
the entries whose keyword occurs in that line; only those lines meet the regexes.

Two engines, the same answers (a test runs both):

- Hyperscan (Intel's SIMD multi-pattern matcher, PyPI `hyperscan`) where its wheel
  exists (x86-64): measured here at 1.5 GB/s over a block with 26 keywords, against
  0.43 GB/s for an RE2 alternation and 0.12 GB/s for one `bytes.find` pass per keyword.
- RE2: one alternation of the keywords, each in its own group, searched left to right.

Both are linear in the block. A keyword that occurs several times in a line counts once.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

import re2

from sentinel.logs.regex import LineRegex

__all__ = ["KeywordScanner", "hyperscan_available"]

_hs: Any
try:  # pragma: no cover - which branch runs depends on the platform
    import hyperscan as _hs
except ImportError:  # no wheel for this platform: the RE2 engine serves
    _hs = None


def hyperscan_available() -> bool:
    """True when the Hyperscan engine can be used on this machine."""
    return _hs is not None


class KeywordScanner:
    """Finds lines holding any of `keywords`; `masks[i]` is what keyword `i` stands for."""

    def __init__(self, keywords: Sequence[bytes], masks: Sequence[int], *, engine: str = "auto") -> None:
        if len(keywords) != len(masks):
            raise ValueError("one mask per keyword")
        if engine not in ("auto", "hyperscan", "re2"):
            raise ValueError(f"unknown engine {engine!r}")
        if engine == "hyperscan" and _hs is None:
            raise ValueError("hyperscan is not installed")
        self._masks = tuple(masks)
        self.engine = "hyperscan" if engine != "re2" and _hs is not None and keywords else "re2"
        self._db: Any = None
        self._alternation: LineRegex | None = None
        self._set: Any = None
        self._scratch: threading.local | None = None
        if not keywords:
            return
        if self.engine == "hyperscan":
            assert _hs is not None
            db = _hs.Database(mode=_hs.HS_MODE_BLOCK)
            db.compile(
                expressions=[re.escape(k.decode("latin-1")).encode("latin-1") for k in keywords],
                ids=list(range(len(keywords))),
                elements=len(keywords),
                flags=[0] * len(keywords),
            )
            self._db = db
            self._scratch = threading.local()  # Hyperscan's scratch space is per scanning thread
        else:
            escaped = [re.escape(k.decode("latin-1")) for k in keywords]
            self._alternation = LineRegex("|".join(escaped))
            # The alternation finds a line; the set names every keyword in it (overlapping ones too).
            keyword_set = re2.Set.SearchSet()
            for pattern in escaped:
                keyword_set.Add(pattern)
            keyword_set.Compile()
            self._set = keyword_set

    def scan(self, data: bytes) -> dict[int, int]:
        """Line start offset -> bitmask of entries with a keyword in that line."""
        if self._db is not None:
            ends: list[tuple[int, int]] = []
            append = ends.append

            def on_match(kw: int, _start: int, end: int, _flags: int, _ctx: object) -> None:
                append((end, kw))

            assert self._scratch is not None
            scratch = getattr(self._scratch, "space", None)
            if scratch is None:
                assert _hs is not None
                scratch = self._scratch.space = _hs.Scratch(self._db)
            self._db.scan(data, match_event_handler=on_match, scratch=scratch)
            return self._lines(data, ends)
        hits: dict[int, int] = {}
        if self._alternation is None:
            return hits
        pos, n, spans, masks = 0, len(data), self._alternation.spans, self._masks
        while pos < n:
            found = spans(data, pos, n)
            if found is None:
                break
            start = data.rfind(b"\n", 0, found[0][0]) + 1
            nl = data.find(b"\n", found[0][1])
            end = nl if nl >= 0 else n
            mask = 0
            for kw in self._set.Match(data[start:end]) or ():
                mask |= masks[kw]
            hits[start] = mask
            pos = end + 1
        return hits

    def _lines(self, data: bytes, ends: list[tuple[int, int]]) -> dict[int, int]:
        hits: dict[int, int] = {}
        masks = self._masks
        rfind = data.rfind
        line_start, line_end = -1, -1
        for end, kw in ends:
            if not line_start <= end - 1 < line_end:
                line_start = rfind(b"\n", 0, end - 1) + 1
                nl = data.find(b"\n", end - 1)
                line_end = nl if nl >= 0 else len(data)
            hits[line_start] = hits.get(line_start, 0) | masks[kw]
        return hits
