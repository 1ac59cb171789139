"""Following a systemd unit's journal through `journalctl -f -o json`.

`journalctl` is the supported reader of the journal's files (no C binding needed),
and its JSON output carries each entry's cursor. The cursor of the last entry handed
on is saved in the `OffsetStore`, and a restart continues with `--after-cursor`, so a
restart of Sentinel neither loses nor repeats entries. Without a saved cursor it
starts at the end (`--lines=0`), as files do on first sight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from sentinel.logs.lines import LineSplitter
from sentinel.logs.offsets import OffsetStore
from sentinel.logs.pipeline import LineSink, ReaderThread
from sentinel.logs.process import ProcessFollower

__all__ = ["JournalReader", "journal_argv", "message_bytes"]

log = logging.getLogger(__name__)


def journal_argv(journalctl: str, unit: str, cursor: str | None) -> list[str]:
    """The command line that follows `unit` from `cursor` (or from now)."""
    argv = [journalctl, "--follow", "--output=json", "--all", "--no-pager", f"--unit={unit}"]
    argv.append(f"--after-cursor={cursor}" if cursor else "--lines=0")
    return argv


def message_bytes(entry: object) -> bytes | None:
    """An entry's MESSAGE as bytes: journald gives a string, or a byte array when not UTF-8."""
    if not isinstance(entry, dict):
        return None
    message = entry.get("MESSAGE")
    if isinstance(message, str):
        return message.encode("utf-8", "surrogatepass")
    if isinstance(message, list) and all(isinstance(b, int) and 0 <= b < 256 for b in message):
        return bytes(message)
    return None  # absent, or null (a field over journalctl's size limit)


class JournalReader(ReaderThread):
    """A thread following one unit's journal into a `LineSink`."""

    def __init__(
        self,
        unit: str,
        source_id: str,
        sink: LineSink,
        offsets: OffsetStore,
        *,
        max_line_bytes: int,
        journalctl: str = "journalctl",
        extra_argv: Sequence[str] = (),
        retry_min_s: float = 1.0,
    ) -> None:
        super().__init__()
        self.thread_name = f"sentinel-journal-{unit}"
        self.unit = unit
        self._source_id = source_id
        self._sink = sink
        self._offsets = offsets
        self._max_line_bytes = max_line_bytes
        self._journalctl = journalctl
        self._extra_argv = tuple(extra_argv)
        # A JSON line is longer than its message (escapes, other fields); cut only beyond that.
        self._json_lines = LineSplitter(6 * max_line_bytes + 64 * 1024)
        self._follower = ProcessFollower(
            f"journalctl --unit={unit}",
            self._argv,
            self._on_data,
            sink,
            self._stop,
            on_idle=self._idle,
            retry_min_s=retry_min_s,
        )

    @property
    def starts(self) -> int:
        """How many times journalctl was started."""
        return self._follower.starts

    def run(self) -> None:
        try:
            self._follower.run()
        finally:
            self._offsets.persist()

    def _idle(self) -> None:
        self._offsets.maybe_persist()

    def _argv(self) -> list[str]:
        self._json_lines.reset()  # a new process starts on a line boundary
        cursor = self._offsets.cursor(self._source_id)
        follower = self._follower
        if cursor and follower.starts and not follower.last_output and "cursor" in follower.last_stderr.lower():
            # The journal no longer has that entry (vacuumed, or another machine's journal):
            # retrying the same cursor would fail forever.
            log.warning(
                "journal of %s: saved cursor not accepted (%s); following from now on", self.unit, follower.last_stderr
            )
            self._offsets.forget_cursor(self._source_id)
            cursor = None
        argv = journal_argv(self._journalctl, self.unit, cursor)
        return argv[:1] + list(self._extra_argv) + argv[1:]

    def _on_data(self, data: bytes) -> None:
        block, cut_json = self._json_lines.feed(data)
        if not block:
            return
        parts: list[bytes] = []
        cut = 0
        cursor: str | None = None
        limit = self._max_line_bytes
        for line in block.split(b"\n"):
            if not line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                # One fixed message, so a stream of such lines is counted and logged once.
                self._sink.problem("journal-json", "journalctl printed lines that are not JSON (skipped)")
                continue
            message = message_bytes(entry)
            if isinstance(entry, dict) and isinstance(entry.get("__CURSOR"), str):
                cursor = entry["__CURSOR"]
            if message is None:
                continue
            if len(message) > limit:
                message = message[:limit]
                cut += 1
            parts.append(message)
            parts.append(b"\n")
        if cursor is not None:
            # Claimed before matching, as the file tailer does: a block whose matching killed
            # the daemon is not read again after the restart.
            self._offsets.set_cursor(self._source_id, cursor)
        self._sink.feed(b"".join(parts), cut + cut_json)
