"""Read positions that survive a restart: per-file offsets and journal cursors.

A file is known by its identity (device, inode), not its name, so a rotated file is
still recognised under its new name. The state file is replaced atomically (temp
file, fsync, rename, fsync of the directory): a crash leaves the old or the new
state, never a torn one (`sentinel.state.files.atomic_write`). Writes are throttled to about one a second; `persist` at
close writes the last positions, so a clean restart neither loses nor repeats lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sentinel.state.files import atomic_write

__all__ = ["FileOffset", "OffsetStore"]

log = logging.getLogger(__name__)

_VERSION = 1


@dataclass(frozen=True)
class FileOffset:
    """Where reading of one file stopped: the end of the last complete line handed on."""

    source: str
    path: str
    dev: int
    ino: int
    offset: int
    skip: bool = False
    """True when the offset lies inside an over-long line whose rest is being dropped."""

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.source, self.dev, self.ino)


class OffsetStore:
    """Thread-safe positions of every source, persisted as JSON in the state directory."""

    def __init__(self, path: Path, *, min_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._files: dict[tuple[str, int, int], FileOffset] = {}
        self._cursors: dict[str, str] = {}
        self._sources: set[str] = set()
        self._dirty = False
        self._last_write = -1e18
        self._write_failed = False
        self.loaded = False
        """True when a previous run's state was found."""
        self.previous_sources: frozenset[str] = frozenset()
        """The sources the previous run was watching (a new file of one of them is read from its start)."""

    # -- loading -------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path, **kwargs: Any) -> OffsetStore:
        """The state at `path`; a missing file is a first start, a corrupt one is set aside."""
        store = cls(path, **kwargs)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            store._restore(data)
            store.loaded = True
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("log offsets in %s are unreadable (%s); starting at the end of each log", path, exc)
            with contextlib.suppress(OSError):
                os.replace(path, path.with_name(path.name + ".bad"))
        return store

    def _restore(self, data: Any) -> None:
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise ValueError(f"unknown format version {data.get('version') if isinstance(data, dict) else None!r}")
        for entry in data.get("files", []):
            f = FileOffset(
                str(entry["source"]),
                str(entry["path"]),
                int(entry["dev"]),
                int(entry["ino"]),
                int(entry["offset"]),
                bool(entry.get("skip", False)),
            )
            self._files[f.key] = f
        self._cursors = {str(k): str(v) for k, v in dict(data.get("cursors", {})).items()}
        self.previous_sources = frozenset(str(s) for s in data.get("sources", []))

    # -- reading and updating -------------------------------------------------------

    def file(self, source: str, dev: int, ino: int) -> FileOffset | None:
        with self._lock:
            return self._files.get((source, dev, ino))

    def files_of(self, source: str) -> list[FileOffset]:
        with self._lock:
            return [f for f in self._files.values() if f.source == source]

    def set_file(self, entry: FileOffset) -> None:
        with self._lock:
            if self._files.get(entry.key) != entry:
                self._files[entry.key] = entry
                self._dirty = True

    def forget_file(self, source: str, dev: int, ino: int) -> None:
        with self._lock:
            if self._files.pop((source, dev, ino), None) is not None:
                self._dirty = True

    def cursor(self, source: str) -> str | None:
        with self._lock:
            return self._cursors.get(source)

    def set_cursor(self, source: str, cursor: str) -> None:
        with self._lock:
            if self._cursors.get(source) != cursor:
                self._cursors[source] = cursor
                self._dirty = True

    def forget_cursor(self, source: str) -> None:
        with self._lock:
            if self._cursors.pop(source, None) is not None:
                self._dirty = True

    def watch_sources(self, sources: set[str]) -> None:
        """Name the sources this run watches (recorded for the next start)."""
        with self._lock:
            if sources != self._sources:
                self._sources = set(sources)
                self._dirty = True

    # -- writing -----------------------------------------------------------------------

    def maybe_persist(self) -> bool:
        """Write when something changed and the last write is at least `min_interval_s` old."""
        with self._lock:
            if not self._dirty or self._clock() - self._last_write < self._min_interval_s:
                return False
        return self.persist()

    def persist(self) -> bool:
        """Write now if anything changed; False when the write failed (logged once)."""
        with self._lock:
            if not self._dirty:
                return True
            data = {
                "version": _VERSION,
                "saved_at": time.time(),
                "sources": sorted(self._sources),
                "files": [asdict(f) for f in sorted(self._files.values(), key=lambda f: (f.source, f.path, f.ino))],
                "cursors": dict(sorted(self._cursors.items())),
            }
            self._dirty = False
            self._last_write = self._clock()
            try:
                atomic_write(self.path, json.dumps(data, indent=1).encode())
            except OSError as exc:
                self._dirty = True
                if not self._write_failed:
                    log.warning("cannot save log offsets to %s: %s", self.path, exc)
                self._write_failed = True
                return False
            if self._write_failed:
                log.info("log offsets are saved to %s again", self.path)
            self._write_failed = False
            return True
