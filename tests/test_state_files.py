"""The state directory's lock and its one atomic file write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sentinel.state.files import atomic_write
from sentinel.state.lock import LOCK_FILE, StateDirBusy, StateDirLock


def test_a_second_lock_on_the_same_directory_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first = StateDirLock(tmp_path)
    first.acquire()
    second = StateDirLock(tmp_path)
    with pytest.raises(StateDirBusy, match=rf"in use by another Sentinel \(pid {os.getpid()}\)"):
        second.acquire()
    first.release()
    second.acquire()  # free again once the holder let go
    second.release()


def test_the_lock_goes_with_a_killed_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from sentinel.state.lock import StateDirLock; "
            "StateDirLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StateDirBusy):
            StateDirLock(tmp_path).acquire()
        holder.kill()
        holder.wait(10)
        lock = StateDirLock(tmp_path)
        lock.acquire()  # no stale lock after kill -9, unlike a pid file
        lock.release()
        assert (tmp_path / LOCK_FILE).exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_atomic_write_replaces_content_keeps_an_existing_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "gpus.json"
    atomic_write(path, b"one", 0o644)
    assert path.read_bytes() == b"one" and (path.stat().st_mode & 0o777) == 0o644
    path.chmod(0o600)
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two" and (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["gpus.json"]
