"""Finding the vLLM environment, the launcher's flags, and clear messages when it is missing (no vLLM needed)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sentinel.demo.local import main as demo_main
from sentinel.sim.vllm_env import (
    ENV_VAR,
    PLUGIN_GROUP,
    PLUGIN_TARGET,
    STAMP,
    VllmEnvMissing,
    default_env_dir,
    find_vllm_env,
    repo_root,
)
from sentinel.sim.vllm_serve import LaunchError, build_argv


def _fake_env(root: Path, *, stamp: bool = True, models: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("")
    model, int8 = root / "m", root / "m8"
    if models:
        for d in (model, int8):
            d.mkdir()
            (d / "sentinel-model.json").write_text("{}")
    if stamp:
        data = {"vllm": "0.32.0", "torch": "2.13.0+cpu", "model": str(model), "int8_model": str(int8)}
        (root / STAMP).write_text(json.dumps(data))
    return root


def test_default_env_is_in_the_checkout_and_the_variable_moves_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_env_dir() == repo_root() / ".venv-vllm"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    assert default_env_dir() == tmp_path / "elsewhere"


def test_a_built_env_is_found_with_its_versions_and_models(tmp_path: Path) -> None:
    env = find_vllm_env(_fake_env(tmp_path / "env"))
    assert env.vllm_version == "0.32.0"
    assert env.serve_argv(8123)[1:] == ["-m", "sentinel.sim.vllm_serve", "--port", "8123"]
    served = env.serve_env()
    assert served["VLLM_MODEL_DIR"] == str(tmp_path / "env" / "m")
    assert served["HF_HUB_OFFLINE"] == "1"


def test_the_probe_plugin_is_seen_from_the_environments_package_metadata(tmp_path: Path) -> None:
    env = find_vllm_env(_fake_env(tmp_path / "env"))
    assert not env.has_probe_plugin()
    dist = tmp_path / "env" / "lib" / "python3.11" / "site-packages" / "sentinel_moe-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sentinel-moe\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[vllm.general_plugins]\nother = elsewhere:register\n")
    assert not env.has_probe_plugin()
    (dist / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\nsentinel_probe = {PLUGIN_TARGET}\n")
    assert env.has_probe_plugin()


def test_the_package_declares_the_entry_point_make_vllm_env_checks() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((repo_root() / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][PLUGIN_GROUP]["sentinel_probe"] == PLUGIN_TARGET


@pytest.mark.parametrize(
    ("stamp", "models", "says"),
    [(False, True, "incomplete"), (True, False, "missing or half-written")],
)
def test_an_incomplete_env_names_make_vllm_env(tmp_path: Path, stamp: bool, models: bool, says: str) -> None:
    with pytest.raises(VllmEnvMissing) as err:
        find_vllm_env(_fake_env(tmp_path / "env", stamp=stamp, models=models))
    assert says in str(err.value) and "make vllm-env" in str(err.value)


def test_no_env_at_all_names_make_vllm_env(tmp_path: Path) -> None:
    with pytest.raises(VllmEnvMissing, match=r"no vLLM environment at .*make vllm-env"):
        find_vllm_env(tmp_path / "nothing")


def test_a_corrupt_stamp_is_reported_not_raised(tmp_path: Path) -> None:
    root = _fake_env(tmp_path / "env")
    (root / STAMP).write_text("{not json")
    with pytest.raises(VllmEnvMissing, match="unreadable"):
        find_vllm_env(root)


def test_demo_with_engine_vllm_and_no_env_prints_how_to_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "absent"))
    assert demo_main(["--engine", "vllm"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "make vllm-env" in err and "Traceback" not in err


def test_demo_cli_without_env_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sentinel.cli.main", "demo", "--engine", "vllm", "--json"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", ENV_VAR: str(tmp_path / "absent")},
        timeout=120,
        cwd=repo_root(),
    )
    assert proc.returncode == 2
    assert "make vllm-env" in proc.stderr and "Traceback" not in proc.stderr


def test_launcher_turns_the_profile_into_vllm_flags() -> None:
    env = {"VLLM_MODEL_DIR": "/m", "VLLM_INT8_MODEL_DIR": "/m8", "MAX_NUM_SEQS": "2"}
    argv = build_argv(9000, env, python="/py")
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == "/m"
    assert argv[argv.index("--max-num-seqs") + 1] == "2"
    assert argv[argv.index("--port") + 1] == "9000"
    assert "--enforce-eager" in argv
    quantized = build_argv(9000, {**env, "QUANTIZATION": "int8", "VLLM_EXTRA_ARGS": "--num-gpu-blocks-override 12"})
    assert quantized[quantized.index("--model") + 1] == "/m8"
    assert quantized[-2:] == ["--num-gpu-blocks-override", "12"]


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"VLLM_MODEL_DIR": "/m", "MAX_NUM_SEQS": "many"}, "MAX_NUM_SEQS"),
        ({"VLLM_MODEL_DIR": "/m", "MAX_NUM_SEQS": "0"}, "MAX_NUM_SEQS"),
        ({"VLLM_MODEL_DIR": "/m", "QUANTIZATION": "fp4"}, "QUANTIZATION"),
        ({"QUANTIZATION": "int8"}, "VLLM_INT8_MODEL_DIR"),
    ],
)
def test_launcher_names_the_bad_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(LaunchError, match=names):
        build_argv(9000, env)


def test_launcher_command_line_reports_a_bad_profile_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sentinel.sim.vllm_serve", "--port", "9"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MAX_NUM_SEQS": "x", "VLLM_MODEL_DIR": "/m"},
        timeout=120,
        cwd=repo_root(),
    )
    assert proc.returncode == 2
    assert "MAX_NUM_SEQS='x' is not an integer" in proc.stderr and "Traceback" not in proc.stderr
