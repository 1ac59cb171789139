"""Which paths a log glob may read: symlinks only where their owner could read the target anyway.

Sentinel usually runs as root, and a worker's log directory is usually writable by the
worker's user. Without a rule, that user could link `x.log` to `/etc/shadow`, to
Sentinel's control token or to `/proc/self/environ` (Sentinel's own secrets), and
matching lines of it would surface in events, the API and notifications; a `/proc`
file also reports size 0, which looked like a truncation and was re-read forever.

The rule, after the kernel's own `fs.protected_symlinks`: every symlink on the way
from the glob to the file (a directory or the file itself) is followed only when it
is owned by root or by the owner of what it points to, so a link grants no access its
maker did not have. Kubernetes' `/var/log/containers/*.log` links (made by the kubelet,
as root) pass; a worker's link to a root-owned file does not. Files under `/proc`,
`/sys` and `/dev` are never read as logs, whatever the way to them.

A refused path is reported (a read error of its source, logged once) and not opened;
the check runs again on every rescan, so a fixed link is picked up. `check_log_path`
judges a path by `lstat`/`stat`; the tailer then compares the opened file's identity
with the judged one, so a link swapped in between is not read either.
"""

from __future__ import annotations

import os
import stat

__all__ = ["PSEUDO_ROOTS", "check_log_path"]

PSEUDO_ROOTS = ("/proc", "/sys", "/dev")
"""Kernel file systems: their files are not logs (and /proc files report size 0)."""

_MAX_LINKS = 40  # as the kernel's own limit on links followed in one lookup


def check_log_path(path: str) -> str | None:
    """Why `path` must not be read as a log, or None when it may be."""
    real = os.path.realpath(path)
    for root in PSEUDO_ROOTS:
        if real == root or real.startswith(root + os.sep):
            return f"{path} resolves to {real}, a kernel pseudo-file, not a log; not reading it"
    return _check_links(os.path.abspath(path), 0)


def _check_links(path: str, depth: int) -> str | None:
    """Walk `path` component by component; judge each symlink met on the way."""
    if depth > _MAX_LINKS:
        return f"{path}: too many levels of symbolic links"
    parts = [p for p in path.split(os.sep) if p]
    current = os.sep
    for i, part in enumerate(parts):
        candidate = os.path.join(current, part)
        try:
            lst = os.lstat(candidate)
        except OSError:
            return None  # gone, or not ours to judge: opening it will report the error
        if not stat.S_ISLNK(lst.st_mode):
            current = candidate
            continue
        try:
            target = os.stat(candidate)
        except OSError:
            return None  # a dangling link: nothing to read
        if lst.st_uid != 0 and lst.st_uid != target.st_uid:
            return (
                f"{candidate} is a symlink owned by uid {lst.st_uid} to a file owned by uid {target.st_uid}; "
                "a log link must be owned by root or by its target's owner. Not reading it"
            )
        link = os.readlink(candidate)
        resolved = os.path.normpath(os.path.join(current, link))
        rest = os.sep.join(parts[i + 1 :])
        return _check_links(os.path.join(resolved, rest) if rest else resolved, depth + 1)
    return None
