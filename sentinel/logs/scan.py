"""`sentinel logs scan`: run the pattern catalogue over log files, offline.

    sentinel logs scan [--json] [--summary] [--config sentinel.yaml] FILE...

Without flags it prints a readable listing (`file:line: event labels`, then a count
per event). `--json` prints one JSON object per event per line (`file`, `line`
1-based, `event`, `labels`, `value`); `--summary` prints one JSON object
`{event: count}` (after the events when both are given). `-` reads standard input.
Exit status 0 when every file was read; 1 when one could not be (named on stderr, the
others are still scanned); 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import BinaryIO, TextIO

from sentinel.logs.lines import LineSplitter
from sentinel.logs.matcher import LogMatcher, Match
from sentinel.logs.patterns import Catalogue, CatalogueError

__all__ = ["ReadFailure", "main", "scan_batches", "scan_stream"]

_CHUNK = 1024 * 1024
_MAX_LINE_BYTES = 1024 * 1024
_EXCERPT = 160


class ReadFailure(Exception):
    """Reading the scanned stream failed (as opposed to writing the output)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.strerror or str(cause))


def scan_batches(stream: BinaryIO, matcher: LogMatcher, max_line_bytes: int = _MAX_LINE_BYTES) -> Iterator[list[Match]]:
    """The events of a byte stream, a list per chunk read; `Match.line_index` is the 0-based line number.

    Raises `ReadFailure` when the stream cannot be read (a directory, an I/O error).
    """
    splitter = LineSplitter(max_line_bytes)
    base = 0
    while True:
        try:
            data = stream.read(_CHUNK)
        except OSError as exc:
            raise ReadFailure(exc) from exc
        if not data:
            break
        block, _ = splitter.feed(data)
        if block:
            found = matcher.scan_bytes(block, line_numbers=True, first_line=base)
            if found:
                yield found
            base += block.count(b"\n")
    if splitter.carry:  # a last line without a newline is still a line
        found = matcher.scan_bytes(splitter.carry, line_numbers=True, first_line=base)
        if found:
            yield found


def scan_stream(stream: BinaryIO, matcher: LogMatcher, max_line_bytes: int = _MAX_LINE_BYTES) -> Iterator[Match]:
    """Every event in a byte stream, one by one (see `scan_batches`)."""
    for batch in scan_batches(stream, matcher, max_line_bytes):
        yield from batch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sentinel logs scan",
        description="Run Sentinel's log pattern catalogue over files and list the events found.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="log files to scan ('-' for standard input)")
    p.add_argument("--json", action="store_true", help="one JSON object per event per line")
    p.add_argument("--summary", action="store_true", help="one JSON object {event: count}")
    p.add_argument("--config", metavar="PATH", help="sentinel.yaml whose collectors.logs.patterns are added")
    return p


def _catalogue(config_path: str | None) -> Catalogue:
    if config_path is None:
        return Catalogue.load()
    from sentinel.config.models import load_config  # only when asked: keeps the plain scan light

    return Catalogue.load(load_config(config_path).collectors.logs.patterns)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    out, err = sys.stdout, sys.stderr
    try:
        matcher = LogMatcher(_catalogue(args.config))
    except (CatalogueError, OSError, ValueError) as exc:
        print(f"sentinel logs scan: {exc}", file=err)
        return 2
    try:
        return _run(args, matcher, out, err)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(args: argparse.Namespace, matcher: LogMatcher, out: TextIO, err: TextIO) -> int:
    counts: Counter[str] = Counter()
    failed = False
    for name in args.files:
        try:
            if name == "-":
                _scan_one("-", sys.stdin.buffer, matcher, args, counts, out)
            else:
                try:
                    stream = open(name, "rb")  # noqa: SIM115 - an open error is reported apart from output errors
                except OSError as exc:
                    raise ReadFailure(exc) from exc
                with stream:
                    _scan_one(name, stream, matcher, args, counts, out)
        except ReadFailure as exc:
            print(f"sentinel logs scan: cannot read {name}: {exc}", file=err)
            failed = True
    if args.summary:
        out.write(json.dumps(dict(sorted(counts.items()))) + "\n")
    elif not args.json:
        total = sum(counts.values())
        by_event = ", ".join(f"{event} {n}" for event, n in sorted(counts.items()))
        out.write(f"{total} event{'s' if total != 1 else ''}" + (f": {by_event}" if by_event else "") + "\n")
    out.flush()
    return 1 if failed else 0


def _scan_one(
    name: str, stream: BinaryIO, matcher: LogMatcher, args: argparse.Namespace, counts: Counter[str], out: TextIO
) -> None:
    # JSON lines are built from cached pieces and written a chunk at a time: on a log
    # where one line in five is an event, per-event json.dumps and writes cost more than
    # finding the events (measured in bench/log_ingest.py).
    head = '{"file": ' + json.dumps(name) + ', "line": '
    events: dict[str, str] = {}
    label_sets: dict[tuple[tuple[str, str], ...], str] = {}  # few distinct ones: hosts, devices, codes
    for batch in scan_batches(stream, matcher):
        counts.update(m.event for m in batch)
        if args.json:
            records: list[str] = []
            for m in batch:
                event = events.get(m.event)
                if event is None:
                    event = events[m.event] = ', "event": ' + json.dumps(m.event) + ', "labels": '
                number = m.value
                value_json = "null" if number is None or not math.isfinite(number) else repr(number)
                key = tuple(m.labels.items())
                labels = label_sets.get(key)
                if labels is None:
                    if len(label_sets) > 65536:  # peers and pids can be many: keep the cache bounded
                        label_sets.clear()
                    labels = label_sets[key] = json.dumps(m.labels)
                records.append(f'{head}{m.line_index + 1}{event}{labels}, "value": {value_json}}}\n')
            out.write("".join(records))
        elif not args.summary:
            for m in batch:
                labels = " ".join(f"{k}={v}" for k, v in sorted(m.labels.items()))
                value = f" value={m.value:g}" if m.value is not None else ""
                excerpt = m.line.strip()
                if len(excerpt) > _EXCERPT:
                    excerpt = excerpt[: _EXCERPT - 1] + "…"
                out.write(f"{name}:{m.line_index + 1}: {m.event}" + (f" {labels}" if labels else "") + f"{value}\n")
                out.write(f"    {excerpt}\n")


if __name__ == "__main__":
    raise SystemExit(main())
