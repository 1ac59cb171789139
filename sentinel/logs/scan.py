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
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import BinaryIO, TextIO

from sentinel.logs.lines import LineSplitter
from sentinel.logs.matcher import Match, Matcher
from sentinel.logs.patterns import Catalogue, CatalogueError

__all__ = ["ReadFailure", "main", "scan_stream"]

_CHUNK = 1024 * 1024
_MAX_LINE_BYTES = 1024 * 1024
_EXCERPT = 160


class ReadFailure(Exception):
    """Reading the scanned stream failed (as opposed to writing the output)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.strerror or str(cause))


def scan_stream(stream: BinaryIO, matcher: Matcher, max_line_bytes: int = _MAX_LINE_BYTES) -> Iterator[Match]:
    """Every event in a byte stream; `Match.line_index` is the 0-based line number.

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
            yield from _with_base(matcher.scan_bytes(block, line_numbers=True), base)
            base += block.count(b"\n")
    if splitter.carry:  # a last line without a newline is still a line
        yield from _with_base(matcher.scan_bytes(splitter.carry, line_numbers=True), base)


def _with_base(matches: list[Match], base: int) -> Iterator[Match]:
    for m in matches:
        yield Match(m.event, m.labels, m.value, m.line, m.line_index + base)


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
        matcher = Matcher(_catalogue(args.config))
    except (CatalogueError, OSError, ValueError) as exc:
        print(f"sentinel logs scan: {exc}", file=err)
        return 2
    try:
        return _run(args, matcher, out, err)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(args: argparse.Namespace, matcher: Matcher, out: TextIO, err: TextIO) -> int:
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
    name: str, stream: BinaryIO, matcher: Matcher, args: argparse.Namespace, counts: Counter[str], out: TextIO
) -> None:
    for m in scan_stream(stream, matcher):
        counts[m.event] += 1
        if args.json:
            record = {
                "file": name,
                "line": m.line_index + 1,
                "event": m.event,
                "labels": dict(m.labels),
                "value": m.value,
            }
            out.write(json.dumps(record) + "\n")
        elif not args.summary:
            labels = " ".join(f"{k}={v}" for k, v in sorted(m.labels.items()))
            value = f" value={m.value:g}" if m.value is not None else ""
            excerpt = m.line.strip()
            if len(excerpt) > _EXCERPT:
                excerpt = excerpt[: _EXCERPT - 1] + "…"
            out.write(f"{name}:{m.line_index + 1}: {m.event}" + (f" {labels}" if labels else "") + f"{value}\n")
            out.write(f"    {excerpt}\n")


if __name__ == "__main__":
    raise SystemExit(main())
