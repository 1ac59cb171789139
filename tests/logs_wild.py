"""The real-world log corpus (tests/data/logs-wild/): reading it and scoring the catalogue on it.

Each `*.log` file is one excerpt of a public bug report or page. Header lines start with
`# ` (`source:`, `licence:`, `note:`); every other line is `EXPECT<TAB>TEXT`, where EXPECT
is the comma-separated event ids the line must produce, or `-` for none. Ordinary lines
around each fault are kept on purpose: they must stay silent.

    python -m tests.logs_wild        # recall and false alarms, per event and in total
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sentinel.logs import Catalogue, LogMatcher

CORPUS = Path(__file__).parent / "data" / "logs-wild"


@dataclass(frozen=True)
class WildLine:
    file: str
    number: int
    text: str
    expected: frozenset[str]


def load_corpus(root: Path = CORPUS) -> list[WildLine]:
    """Every labelled line of the corpus, in file order."""
    out: list[WildLine] = []
    for path in sorted(root.glob("*.log")):
        headers: set[str] = set()
        for number, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if not raw:
                continue
            if raw.startswith("# "):
                headers.add(raw[2:].split(":", 1)[0])
                continue
            expect, sep, text = raw.partition("\t")
            if not sep:
                raise ValueError(f"{path.name}:{number}: expected EXPECT<TAB>TEXT")
            events = frozenset() if expect == "-" else frozenset(expect.split(","))
            out.append(WildLine(path.name, number, text, events))
        if not {"source", "licence"} <= headers:
            raise ValueError(f"{path.name}: needs '# source:' and '# licence:' headers")
    return out


@dataclass
class Score:
    expected: Counter[str]
    found: Counter[str]
    missed: list[tuple[WildLine, str]]
    false_alarms: list[tuple[WildLine, str]]
    lines: int

    @property
    def recall(self) -> float:
        total = sum(self.expected.values())
        return (total - len(self.missed)) / total if total else 1.0


def score(matcher: LogMatcher, lines: list[WildLine]) -> Score:
    """Each line through `match_line`; what was expected and missed, and what was not expected."""
    expected: Counter[str] = Counter()
    found: Counter[str] = Counter()
    missed: list[tuple[WildLine, str]] = []
    false_alarms: list[tuple[WildLine, str]] = []
    for line in lines:
        got = {m.event for m in matcher.match_line(line.text)}
        expected.update(line.expected)
        found.update(got & line.expected)
        missed += [(line, e) for e in sorted(line.expected - got)]
        false_alarms += [(line, e) for e in sorted(got - line.expected)]
    return Score(expected, found, missed, false_alarms, len(lines))


def main() -> None:
    lines = load_corpus()
    s = score(LogMatcher(Catalogue.load()), lines)
    files = len({line.file for line in lines})
    silent = sum(1 for line in lines if not line.expected)
    print(f"{files} excerpts, {s.lines} lines ({silent} ordinary lines that must stay silent)")
    for event in sorted(s.expected):
        print(f"  {event:22} {s.found[event]:3}/{s.expected[event]:<3}")
    total = sum(s.expected.values())
    print(f"recall {total - len(s.missed)}/{total} = {s.recall:.1%}; false alarms: {len(s.false_alarms)}")
    for line, event in s.missed:
        print(f"  missed {event}: {line.file}:{line.number}: {line.text[:120]}")
    for line, event in s.false_alarms:
        print(f"  false alarm {event}: {line.file}:{line.number}: {line.text[:120]}")


if __name__ == "__main__":
    main()
