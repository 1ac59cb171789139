"""Build item 3 and the low items: files Sentinel reads are bounded, and errors say why.

Config files, rule files, the Xid policy and token files each have a size bound (and
YAML documents a bound once aliases are expanded); crossing it is an error naming the
file, never a hang, a traceback or unbounded memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sentinel.api.control import ControlToken
from sentinel.collectors.xid_policy import XidPolicy, XidPolicyError
from sentinel.config.models import MAX_CONFIG_BYTES, Config, ConfigError, load_config, parse_config
from sentinel.rules.rulefile import MAX_RULE_FILE_BYTES, RuleFileError, load_rule_files


def billion_laughs(levels: int = 7) -> str:
    """A 400-byte YAML document whose aliases expand to 9**levels values."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_in_the_config_is_an_error_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.yaml"
    path.write_text(billion_laughs())
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sentinel", "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "expands to more than" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30


def test_deep_nesting_in_the_config_is_an_error_not_a_traceback() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_config("a: " + "[" * 5000 + "]" * 5000)


def test_an_oversized_or_endless_config_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)
    with pytest.raises(ConfigError, match="larger than"):
        load_config("/dev/zero")  # read in full before, it never ended


def test_oversized_and_exploding_rule_files_are_errors_naming_the_file(tmp_path: Path) -> None:
    big = tmp_path / "big.yml"
    big.write_bytes(b"# padding\n" * (MAX_RULE_FILE_BYTES // 10 + 1))
    bomb = tmp_path / "bomb.yml"
    bomb.write_text(billion_laughs())
    with pytest.raises(RuleFileError) as raised:
        load_rule_files([str(big), str(bomb)])
    text = str(raised.value)
    assert f"{big}" in text and "larger than" in text
    assert f"{bomb}" in text and "excessive aliasing" in text  # yaml.v3's words, as promtool prints them


def test_the_xid_policy_file_is_validated_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("xids:\n  79: {class: hardware, action: reboot_host, description: x, extra: 1}\n")
    with pytest.raises(XidPolicyError, match=r"policy.yaml: xids\.79\.extra: unknown key"):
        XidPolicy.load(path=path)
    path.write_text("xids:\n  -3: {class: hardware, action: reboot_host, description: x}\n")
    with pytest.raises(XidPolicyError, match="positive integer"):
        XidPolicy.load(path=path)
    path.write_text("xids: [1, 2]\n")
    with pytest.raises(XidPolicyError, match="expected a mapping"):
        XidPolicy.load(path=path)
    path.write_bytes(b"#" * (2 * 1024 * 1024))
    with pytest.raises(XidPolicyError, match="larger than"):
        XidPolicy.load(path=path)


def test_a_state_directory_that_cannot_be_written_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The start-up error ended in ": None" for a directory that exists but is not
    # writable (a read-only mount: mkdir succeeds, no exception to quote).
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OSError) as raised:
        Config(state_dir=str(tmp_path)).resolved_state_dir()
    message = str(raised.value)
    assert not message.endswith("None") and f"{tmp_path}: not writable by uid" in message


def test_an_oversized_control_token_file_disables_the_api_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"t" * 10_000)
    token = ControlToken(str(path))
    token.load()
    assert not token.enabled
    assert token.refusal("Bearer x") == (403, f"the control API is disabled: {path} is larger than 4096 bytes")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("!!python/object:os.system x\n", "could not determine a constructor"),  # found by tests/test_fuzz_config.py
        ("? [a, b]: 1\n", "a mapping key must be a plain value"),  # was TypeError: unhashable type
        ("? ? a: \n", "a mapping key must be a plain value"),
    ],
)
def test_yaml_the_safe_loader_refuses_is_a_config_error_not_a_traceback(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text)
