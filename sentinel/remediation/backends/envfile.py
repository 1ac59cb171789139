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

Writes are atomic (`sentinel.state.files.atomic_write`): a reader (systemd starting the
unit, a concurrent Sentinel call) sees the old file or the new one, never a mix, and a
power cut after the rename cannot leave an empty file behind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from sentinel.remediation.settings import Profile
from sentinel.state.files import atomic_write

__all__ = [
    "PROFILE_KEY",
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
    """Variables in a profile file: what `format_env` writes, and simple hand-written lines.

    Sentinel reads these files back only for what it wrote itself (above all
    `SENTINEL_PROFILE`), so this reads one assignment per line: blank lines and lines
    starting with `#` or `;` are skipped, as are lines without `=` or with an invalid
    name; in a value in double quotes a backslash escapes a backslash, a double quote, a
    dollar or a backquote (before anything else it stays, as in systemd and the shell), one in single quotes is
    literal, a bare value runs to the end of the line, trimmed. A later assignment wins.
    systemd's rarer forms (a backslash continuing a line, adjacent quoted parts) are not
    read: Sentinel never writes them.
    """
    result: dict[str, str] = {}
    for line in text.split("\n"):
        line = line.lstrip(_WHITESPACE)
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.rstrip(_WHITESPACE)
        if _valid_key(key):
            result[key] = _value(value.lstrip(_WHITESPACE))
    return result


def _value(text: str) -> str:
    if text.startswith("'"):
        return text[1:].split("'", 1)[0]
    if not text.startswith('"'):
        return text.rstrip(_WHITESPACE + "\r")
    out: list[str] = []
    chars = iter(text[1:])
    for c in chars:
        if c == '"':
            break
        if c == "\\":
            escaped = next(chars, "")
            out.append(escaped if escaped in _ESCAPED else "\\" + escaped)
        else:
            out.append(c)
    return "".join(out)


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
