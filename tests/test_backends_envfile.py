"""The profile file: systemd EnvironmentFile= quoting, read-back, and atomic replacement."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.remediation.backends.envfile import (
    PROFILE_KEY,
    format_env,
    parse_env,
    read_profile_name,
    write_profile,
)
from sentinel.remediation.settings import Profile
from sentinel.state.files import atomic_write

HOSTILE_VALUES = {
    "PLAIN": "64",
    "SPACES": "  padded value  ",
    "DOLLAR": "$HOME ${PATH} $(touch /nonexistent/pwned)",
    "BACKTICK": "`id`",
    "QUOTES": 'it\'s "quoted"',
    "BACKSLASH": "C:\\path\\n not a newline \\",
    "HASH": "#not a comment ;nor this",
    "EQUALS": "a=b=c",
    "CR": "carriage\rreturn",
    "UNICODE": "Grüße ✓",
    "EMPTY": "",
}

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True).filter(lambda n: n != PROFILE_KEY)
values = st.text(st.characters(codec="utf-8", exclude_characters="\n\0"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(env=st.dictionaries(names, values, max_size=8), profile=st.from_regex(r"[A-Za-z0-9_.\-]+", fullmatch=True))
def test_any_profile_env_reads_back_identically(env: dict[str, str], profile: str) -> None:
    assert parse_env(format_env(env, profile)) == {**env, PROFILE_KEY: profile}


def test_hostile_values_read_the_same_through_a_posix_shell(tmp_path: Path) -> None:
    # bash's double-quote rules are the ones systemd >= v239 adopted; sourcing the file
    # must give the operator the same values Sentinel meant.
    path = tmp_path / "worker.env"
    path.write_text(format_env(HOSTILE_VALUES, "full"))
    dumped = subprocess.run(
        ["bash", "-c", 'set -a; . "$1"; env -0', "bash", str(path)],
        capture_output=True,
        check=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    ).stdout
    shell_env = dict(item.split("=", 1) for item in dumped.decode().split("\0") if "=" in item)
    for key, value in {**HOSTILE_VALUES, PROFILE_KEY: "full"}.items():
        assert shell_env[key] == value, key
    assert parse_env(path.read_bytes().decode()) == {**HOSTILE_VALUES, PROFILE_KEY: "full"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1\nB=2", {"A": "1", "B": "2"}),
        ("# comment\n; also a comment\n  A = spaced  \n", {"A": "spaced"}),
        ("A='single $X \\n'\n", {"A": "single $X \\n"}),
        ('A="x\\y\\$\\"\\\\"\n', {"A": 'x\\y$"\\'}),
        ('A=bare "not quoted"\n', {"A": 'bare "not quoted"'}),
        ("1A=x\nA B=y\nno equals\nC=z\n", {"C": "z"}),
        ("A=1\nA=2\n", {"A": "2"}),
        ("A=\n", {"A": ""}),
    ],
)
def test_parser_reads_what_sentinel_writes_and_simple_hand_written_lines(text: str, expected: dict[str, str]) -> None:
    assert parse_env(text) == expected


def test_parser_reads_one_assignment_per_line_and_no_continuations() -> None:
    # systemd would join these lines; Sentinel never writes them, and reads each line alone.
    assert parse_env("A=con\\\ntinued\n") == {"A": "con\\"}


@pytest.mark.parametrize("bad", ["two\nlines", "nul\0byte"])
def test_values_systemd_cannot_hold_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="newlines or NUL"):
        format_env({"X": bad}, "p")


def test_profile_name_is_written_last_and_wins_over_a_stray_variable(tmp_path: Path) -> None:
    path = tmp_path / "w.env"
    write_profile(path, Profile(name="fp8", env={"SENTINEL_PROFILE": "spoof", "QUANT": "fp8"}))
    assert read_profile_name(path) == "fp8"
    assert path.read_text().splitlines()[-1] == 'SENTINEL_PROFILE="fp8"'


def test_missing_file_means_no_recorded_profile(tmp_path: Path) -> None:
    assert read_profile_name(tmp_path / "absent.env") is None


def test_new_file_is_private_and_an_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "w.env"
    write_profile(path, Profile(name="full"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o640)
    write_profile(path, Profile(name="reduced"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert read_profile_name(path) == "reduced"
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.env"]  # no temporary file left behind


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "w.env"
    write_profile(path, Profile(name="full"))
    with pytest.raises(UnicodeEncodeError):
        write_profile(path, Profile(name="bad", env={"X": "\udcff"}))
    assert read_profile_name(path) == "full"
    assert [p.name for p in tmp_path.iterdir()] == ["w.env"]


def test_concurrent_reader_never_sees_a_partial_profile_file(tmp_path: Path) -> None:
    path = tmp_path / "w.env"
    # Large values: a non-atomic write would be caught half-written (read() returns a prefix).
    profiles = [
        Profile(name="full", env={"MAX_NUM_SEQS": "64", "PAD": "a" * 300_000}),
        Profile(name="reduced", env={"MAX_NUM_SEQS": "16", "PAD": "b" * 200_000, "EXTRA": "x"}),
    ]
    expected = [{**p.env, PROFILE_KEY: p.name} for p in profiles]
    write_profile(path, profiles[0])
    stop = threading.Event()
    seen: list[dict[str, str]] = []
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            env = parse_env(path.read_bytes().decode())
            if env not in expected:
                bad.append(f"{len(env)} keys, PAD {len(env.get('PAD', ''))} chars")
            seen.append(env)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(200):
            write_profile(path, profiles[i % 2])
    finally:
        stop.set()
        thread.join()
    assert not bad, bad[:5]
    assert len(seen) > 10  # the reader really ran alongside the writes
    assert {e[PROFILE_KEY] for e in seen} == {"full", "reduced"}


def test_atomic_write_replaces_content_in_one_step(tmp_path: Path) -> None:
    path = tmp_path / "pid"
    atomic_write(path, b"123 456\n", 0o644)
    assert path.read_bytes() == b"123 456\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
