"""`sentinel.yaml` validation and `sentinel check config`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sentinel.config.models import Config, ConfigError, load_config, parse_config, parse_duration, split_listen

REPO = Path(__file__).resolve().parents[1]


def run_check(*files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentinel", "check", "config", *files], capture_output=True, text=True, timeout=60
    )


def test_shipped_example_is_valid_and_equals_the_defaults() -> None:
    assert load_config(REPO / "examples" / "sentinel.yaml") == Config()


def test_no_file_means_built_in_defaults() -> None:
    config = load_config(None)
    assert config.listen.startswith("127.0.0.1:")
    assert config.collectors.nvml.interval == 1.0


def test_every_problem_is_listed_with_line_and_field() -> None:
    text = (
        "listen: 'localhost:99999'\n"  # line 1
        "collectors:\n"
        "  nvml:\n"
        "    interval: 5 parsecs\n"  # line 4
        "  hosts: {}\n"  # line 5: typo of `host`
        "workers:\n"
        "  - name: qwen3\n"
        "    gpus: [0, 0]\n"  # line 8
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "sentinel.yaml")
    lines = str(info.value).splitlines()
    assert "sentinel.yaml:1:1: listen: port 99999 is out of range" in lines
    assert any(x.startswith("sentinel.yaml:4:5: collectors.nvml.interval: invalid duration") for x in lines)
    assert "sentinel.yaml:5:3: collectors.hosts: unknown key" in lines
    assert "sentinel.yaml:8:5: workers.0.gpus: a GPU is listed twice" in lines
    assert len(lines) == 4


def test_yaml_syntax_error_names_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("listen: [unclosed\n", "bad.yaml")
    assert str(info.value).startswith("bad.yaml:2:1: ")


def test_duplicate_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"x.yaml:2:1: duplicate key 'listen'"):
        parse_config("listen: 'a:1'\nlisten: 'b:2'\n", "x.yaml")


def test_cross_field_checks_name_the_field() -> None:
    text = "workers:\n  - {name: a, gpus: [0]}\n  - {name: b, gpus: [0]}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "w.yaml")
    assert "workers.1.gpus: GPU 0 is already assigned to worker 'a'" in str(info.value)
    assert str(info.value).startswith("w.yaml:3:")


def test_process_match_needs_exactly_one_way() -> None:
    with pytest.raises(ConfigError, match="exactly one of pid_file, systemd_unit, cmdline"):
        parse_config("workers:\n  - name: a\n    process: {pid_file: /x, cmdline: y}\n")


def test_config_objects_are_frozen() -> None:
    config = Config()
    with pytest.raises(Exception, match="frozen"):
        config.listen = "x"  # type: ignore[misc]


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("15s", 15), ("1m30s", 90), ("2h", 7200), (3, 3)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_listen_addresses() -> None:
    assert split_listen("[::1]:9847") == ("::1", 9847)
    assert split_listen(":9847") == ("0.0.0.0", 9847)
    with pytest.raises(ValueError):
        split_listen("9847")


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("listen: '127.0.0.1:0'\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: '127.0.0.1:0'\nworkers:\n  - name: 'has space'\n")
    ok = run_check(str(good))
    assert ok.returncode == 0, ok.stderr
    failed = run_check(str(good), str(bad))
    assert failed.returncode == 1
    assert f"{bad}:3:5: workers.0.name:" in failed.stderr
    missing = run_check(str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
