"""`sentinel logs scan` as a real subprocess (`python -m sentinel.logs.scan`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sentinel.logs.scan import main

LOG = (
    "node-01:189884:189901 [3] NCCL INFO Channel 00/0 : 3[3] -> 4[4] via P2P/IPC/read\n"
    "\n"
    "node-01:189884:189884 [3] NCCL WARN Call to ibv_poll_cq() returned -1\n"
    "INFO KV cache memory usage 40%\n"
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 2 has a total capacity of 79 GiB\n"
    "EPLB step: avg_tokens=512.00, max_tokens=730, balancedness=0.7014"  # no final newline: still a line
)


def scan(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentinel.logs.scan", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
    )


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "worker.log"
    path.write_text(LOG)
    return path


def test_json_lists_each_event_with_file_line_labels_and_value(log_file: Path) -> None:
    result = scan("--json", str(log_file))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["line"], r["event"]) for r in records] == [
        (3, "nccl_warn"),
        (3, "nccl_net_error"),
        (5, "cuda_oom"),
        (6, "expert_balancedness"),
    ]
    assert all(r["file"] == str(log_file) for r in records)
    assert records[2]["labels"] == {"gpu": "2", "reason": "allocator"}
    assert records[3]["value"] == pytest.approx(0.7014)
    assert records[0]["value"] is None


def test_summary_counts_events_over_all_files(log_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.log"
    other.write_text("RuntimeError: CUDA error: out of memory\n")
    result = scan("--summary", str(log_file), str(other))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"cuda_oom": 2, "expert_balancedness": 1, "nccl_net_error": 1, "nccl_warn": 1}


def test_plain_listing_is_readable(log_file: Path) -> None:
    result = scan(str(log_file))
    assert result.returncode == 0
    assert f"{log_file}:5: cuda_oom gpu=2 reason=allocator" in result.stdout
    assert result.stdout.rstrip().endswith("4 events: cuda_oom 1, expert_balancedness 1, nccl_net_error 1, nccl_warn 1")


def test_unreadable_file_is_named_and_the_exit_status_is_nonzero(log_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.log"
    result = scan("--summary", str(missing), str(tmp_path), str(log_file))
    assert result.returncode == 1
    assert f"cannot read {missing}: No such file or directory" in result.stderr
    assert f"cannot read {tmp_path}: Is a directory" in result.stderr
    assert json.loads(result.stdout)["cuda_oom"] == 1  # the readable file was still scanned


def test_standard_input_and_undecodable_bytes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sentinel.logs.scan", "--summary", "-"],
        input=b"\xff\xfe garbage\x00\nRuntimeError: CUDA error: out of memory\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"cuda_oom": 1}


def test_config_patterns_are_added(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        "collectors:\n  logs:\n    patterns:\n      - id: disk_full\n        regex: 'No space left on device'\n"
    )
    log = tmp_path / "w.log"
    log.write_text("OSError: [Errno 28] No space left on device\n")
    assert main(["--summary", "--config", str(config), str(log)]) == 0
    assert json.loads(capsys.readouterr().out) == {"disk_full": 1}
