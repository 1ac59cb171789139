"""The active profile on disk: an environment file in systemd's `EnvironmentFile=` format.

A worker started by systemd reads its launch profile from the unit's `EnvironmentFile=`;
the process and command backends keep the same file under the state directory. Either
way the file also holds `SENTINEL_PROFILE=<name>`, so that after a restart of Sentinel
the active profile is read back from the file rather than guessed.

Every value is written in double quotes with `\\`, `"`, `$` and backquote escaped. That
is the one quoting on which systemd (old and new: before v239 a backslash in double
quotes escaped any character, since then only these four), the POSIX shell (`. file`)
and this module's reader all agree, so the operator can also source the file by hand.
Newlines and NUL cannot be expressed (systemd would join or cut the value) and are
refused.

Writes are atomic: a temporary file in the same directory, fsync, rename over the old
file, fsync of the directory. A reader (systemd starting the unit, a concurrent Sentinel
call) sees the old file or the new one, never a mix, and a power cut after the rename
cannot leave an empty file behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from sentinel.remediation.settings import Profile

__all__ = [
    "PROFILE_KEY",
    "atomic_write",
    "format_env",
    "parse_env",
    "read_env_file",
    "read_profile_name",
    "write_profile",
]

PROFILE_KEY = "SENTINEL_PROFILE"

_HEADER = "# Written by Sentinel: the worker's active launch profile. Edits are overwritten.\n"
_ESCAPED = '\\"$`'
_WHITESPACE = " \t"
_NEWLINE = "\n\r"  # systemd ends a line at either
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _valid_key(key: str) -> bool:
    return _NAME.fullmatch(key) is not None


def _quote(value: str) -> str:
    return '"' + "".join("\\" + c if c in _ESCAPED else c for c in value) + '"'


def format_env(env: Mapping[str, str], profile: str | None = None) -> str:
    """The file's text: a header, `KEY="value"` lines, and `SENTINEL_PROFILE` last when given.

    `SENTINEL_PROFILE` in `env` is dropped when `profile` is given: the profile's name,
    not a stray variable, must say which profile is active.
    """
    lines = [_HEADER]
    items = [(k, v) for k, v in env.items() if profile is None or k != PROFILE_KEY]
    if profile is not None:
        items.append((PROFILE_KEY, profile))
    for key, value in items:
        if not _valid_key(key):
            raise ValueError(f"invalid environment variable name {key!r}")
        if "\n" in value or "\0" in value:
            raise ValueError(f"{key}: an environment file cannot hold newlines or NUL")
        lines.append(f"{key}={_quote(value)}\n")
    return "".join(lines)


def parse_env(text: str) -> dict[str, str]:
    """Variables in `text`, read the way systemd (v252 `parse_env_file`) reads an `EnvironmentFile=`.

    Comments start with `#` or `;`. Right after `=`, blanks are skipped and a value may
    open single quotes (literal up to the next `'`) or double quotes (backslash escapes
    only `\\ " $` and backquote, and is kept before any other character); a bare value
    runs to the end of the line, a backslash escapes the next character and trailing
    blanks are dropped. A backslash before a newline continues the line. Lines without
    `=` or with an invalid name are skipped, as systemd skips them; a later assignment wins.
    """
    result: dict[str, str] = {}
    state = "pre_key"
    key: list[str] = []
    value: list[str] = []
    solid = 0  # length of `value` up to its last character that is not a trailing blank

    def push() -> None:
        name = "".join(key).rstrip(_WHITESPACE)
        if _valid_key(name):
            result[name] = "".join(value[:solid])

    for c in text:
        if state == "pre_key":
            if c in "#;":
                state = "comment"
            elif c not in _WHITESPACE + _NEWLINE:
                key, value, solid = [c], [], 0
                state = "key"
        elif state == "key":
            if c in _NEWLINE:
                state = "pre_key"  # no '=': not an assignment
            elif c == "=":
                state = "pre_value"
            else:
                key.append(c)
        elif state == "pre_value":
            # Quotes open only here; after a closing quote the parser comes back here.
            if c in _NEWLINE:
                push()
                state = "pre_key"
            elif c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "value_escape"
            elif c not in _WHITESPACE:
                value.append(c)
                solid = len(value)
                state = "value"
        elif state == "value":
            if c in _NEWLINE:
                push()
                state = "pre_key"
            elif c == "\\":
                state = "value_escape"
            else:
                value.append(c)
                if c not in _WHITESPACE:
                    solid = len(value)
        elif state == "value_escape":
            state = "value"
            if c not in _NEWLINE:  # backslash-newline: the value goes on on the next line
                value.append(c)
                solid = len(value)
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value.append(c)
                solid = len(value)
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value.append(c)
                solid = len(value)
        elif state == "double_escape":
            state = "double"
            if c in _ESCAPED:
                value.append(c)
            elif c != "\n":
                value.extend(("\\", c))  # like the shell: other backslashes stay
            solid = len(value)
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif c in _NEWLINE:
                state = "pre_key"
        elif state == "comment_escape":
            state = "comment"
    if state not in ("pre_key", "key", "comment", "comment_escape"):
        push()  # the last line had no newline
    return result


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that no reader ever sees a partial file.

    A new file gets `mode`; an existing one keeps its mode. Blocking: call it from a
    thread in async code.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        mode = path.stat().st_mode & 0o7777
    # Same directory: rename(2) is atomic only within one filesystem.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    # The rename lives in the directory: without this fsync a crash can undo it.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_profile(path: Path, profile: Profile, extra: Mapping[str, str] | None = None) -> None:
    """Write `profile` (its env, `extra` first, then `SENTINEL_PROFILE`) to `path` atomically.

    The mode of a new file is 0600: systemd reads `EnvironmentFile=` as root, and a
    profile's environment may hold tokens. Blocking: call it from a thread.
    """
    env = {**(extra or {}), **profile.env}
    atomic_write(path, format_env(env, profile.name).encode())


def read_env_file(path: Path) -> dict[str, str] | None:
    """Variables in the file at `path`; None when there is no such file."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    return parse_env(text)


def read_profile_name(path: Path) -> str | None:
    """The `SENTINEL_PROFILE` recorded in the file at `path`; None when unknown."""
    env = read_env_file(path)
    if env is None:
        return None
    return env.get(PROFILE_KEY) or None
