"""Cutting a byte stream into complete lines, with a bound on a line's length.

A reader feeds whatever it read; it gets back the complete lines (a block that ends
with a newline) and keeps the partial last line until its newline arrives. A line
longer than `max_line_bytes` is cut to that length, handed on as one line and
counted; the rest of it, up to its newline, is dropped.
"""

from __future__ import annotations

__all__ = ["LineSplitter"]


class LineSplitter:
    """Stateful splitter for one stream. Not thread-safe: one reader owns it."""

    __slots__ = ("carry", "discarding", "max_line_bytes")

    def __init__(self, max_line_bytes: int, *, discarding: bool = False) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        self.max_line_bytes = max_line_bytes
        self.carry = b""
        """The partial last line, waiting for its newline."""
        self.discarding = discarding
        """True while dropping the rest of an over-long line that was already cut."""

    def reset(self) -> None:
        """Forget the partial line (the file was truncated or replaced)."""
        self.carry = b""
        self.discarding = False

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """Complete lines now available (each ending in a newline) and how many were cut."""
        cut = 0
        if self.discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return b"", 0
            data = data[nl + 1 :]
            self.discarding = False
        # One copy at most of the block handed on: the partial line carried over is joined
        # with the new data's complete lines through a memoryview, not by concatenating the
        # whole read and slicing it again (two copies; measured as the hot path's largest cost).
        carry = self.carry
        last = data.rfind(b"\n")
        if last < 0:
            complete, rest = b"", carry + data if carry else data
        elif carry:
            complete, rest = b"".join((carry, memoryview(data)[: last + 1])), data[last + 1 :]
        elif last + 1 == len(data):
            complete, rest = data, b""
        else:
            complete, rest = data[: last + 1], data[last + 1 :]
        limit = self.max_line_bytes
        if len(complete) > limit + 1:
            # Only a block longer than the limit can hold an over-long line.
            complete, cut = self._cut_long_lines(complete)
        if len(rest) > limit:
            complete += rest[:limit] + b"\n"
            cut += 1
            rest = b""
            self.discarding = True
        self.carry = rest
        return complete, cut

    def _cut_long_lines(self, block: bytes) -> tuple[bytes, int]:
        limit = self.max_line_bytes
        parts: list[bytes] = []
        cut = 0
        pos, kept, n = 0, 0, len(block)
        while pos < n:
            # A line starting at `pos` fits when a newline lies within `limit` bytes of it;
            # otherwise jump to the last newline in that window (about `limit` bytes ahead).
            nl = block.rfind(b"\n", pos, pos + limit + 1)
            if nl >= 0:
                pos = nl + 1
                continue
            # No newline in the window: the line at `pos` is too long. (The window lies
            # inside the block here, since the block's last byte is a newline.)
            parts.append(block[kept : pos + limit])
            parts.append(b"\n")
            cut += 1
            pos = block.find(b"\n", pos + limit) + 1  # the block ends with a newline: always found
            kept = pos
        if not cut:
            return block, 0
        parts.append(block[kept:])
        return b"".join(parts), cut
