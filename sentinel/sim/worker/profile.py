"""The worker's launch profile, read from environment variables as systemd or Sentinel pass them.

A worker unit's `EnvironmentFile=` (or Sentinel's process backend) holds the active rung
of the launch ladder: `MAX_NUM_SEQS=4`, `QUANTIZATION=int8`, `SENTINEL_PROFILE=reduced`.
Like vLLM's `--max-num-seqs` and `--quantization` these are read once at start; a change
means a restart. Every problem in the environment is reported together in one error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_REDUNDANT_EXPERTS", "DEFAULT_SEED", "ProfileError", "WorkerProfile"]

DEFAULT_MODEL_NAME = "sim/tiny-qwen3-moe"
QUANTIZATIONS = ("none", "int8")
# The random routers of this seed spread diverse text evenly over the 4 simulated GPUs
# (EPLB balancedness about 0.85, like a trained MoE); some seeds give 0.6 unskewed.
DEFAULT_SEED = 7
# Extra expert slots over the 4 virtual devices (vLLM's num_redundant_experts): 2 per
# device, room to replicate two hot experts onto every device.
DEFAULT_REDUNDANT_EXPERTS = 8


class ProfileError(ValueError):
    """The environment does not describe a valid profile; the message lists every problem."""


@dataclass(frozen=True)
class WorkerProfile:
    """Start-time settings of one simulated worker (see the module doc for the variable names)."""

    name: str = "default"
    worker: str = "sim"
    max_num_seqs: int = 16
    quantization: str = "none"
    memory_budget_bytes: int | None = None
    skew_experts: tuple[int, ...] = ()
    skew_bias: float = 10.0
    port: int = 8000
    host: str = "127.0.0.1"
    probe_url: str | None = None
    model_name: str = DEFAULT_MODEL_NAME
    max_model_len: int = 256
    log_stats_interval: float = 5.0
    seed: int = DEFAULT_SEED
    redundant_experts: int = DEFAULT_REDUNDANT_EXPERTS

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerProfile:
        """Read the profile from `env`.

        Variables: `SENTINEL_PROFILE` (name, only logged), `SENTINEL_WORKER` (worker name
        for the probe), `MAX_NUM_SEQS` (default 16), `QUANTIZATION` (none|int8),
        `MEMORY_BUDGET_BYTES`, `SKEW_EXPERTS` ("0,1") and `SKEW_BIAS` (default 10),
        `PORT`, `HOST`, `SENTINEL_PROBE_URL`, `SERVED_MODEL_NAME`, `MAX_MODEL_LEN`,
        `VLLM_LOG_STATS_INTERVAL` (seconds between the periodic log lines), `SIM_SEED`,
        `REDUNDANT_EXPERTS` (extra expert slots over the 4 devices, a multiple of 4; default 8).
        """
        errors: list[str] = []

        def text(key: str, default: str) -> str:
            value = env.get(key, "").strip()
            return value or default

        def integer(key: str, default: int | None, low: int, high: int | None = None) -> int | None:
            raw = env.get(key, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                errors.append(f"{key}={raw!r}: not an integer")
                return default
            if value < low or (high is not None and value > high):
                bound = f"{low}..{high}" if high is not None else f">= {low}"
                errors.append(f"{key}={value}: must be {bound}")
                return default
            return value

        def number(key: str, default: float, low: float) -> float:
            raw = env.get(key, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                errors.append(f"{key}={raw!r}: not a number")
                return default
            if not math.isfinite(value) or value < low:
                errors.append(f"{key}={raw}: must be a finite number >= {low}")
                return default
            return value

        quantization = text("QUANTIZATION", "none").lower()
        if quantization not in QUANTIZATIONS:
            errors.append(f"QUANTIZATION={quantization!r}: must be one of {', '.join(QUANTIZATIONS)}")
            quantization = "none"

        skew: list[int] = []
        for part in env.get("SKEW_EXPERTS", "").replace(" ", "").split(","):
            if not part:
                continue
            try:
                skew.append(int(part))
            except ValueError:
                errors.append(f"SKEW_EXPERTS: {part!r} is not an expert index")

        redundant = integer("REDUNDANT_EXPERTS", DEFAULT_REDUNDANT_EXPERTS, 0, 64)
        if redundant is None or redundant % 4:
            errors.append(f"REDUNDANT_EXPERTS={redundant}: must be a multiple of the 4 expert-parallel devices")
            redundant = DEFAULT_REDUNDANT_EXPERTS

        profile = cls(
            name=text("SENTINEL_PROFILE", "default"),
            worker=text("SENTINEL_WORKER", "sim"),
            max_num_seqs=integer("MAX_NUM_SEQS", 16, 1, 4096) or 16,
            quantization=quantization,
            memory_budget_bytes=integer("MEMORY_BUDGET_BYTES", None, 1),
            skew_experts=tuple(skew),
            skew_bias=number("SKEW_BIAS", 10.0, 0.0),
            port=integer("PORT", 8000, 0, 65535) or 0,
            host=text("HOST", "127.0.0.1"),
            probe_url=env.get("SENTINEL_PROBE_URL", "").strip() or None,
            model_name=text("SERVED_MODEL_NAME", DEFAULT_MODEL_NAME),
            max_model_len=integer("MAX_MODEL_LEN", 256, 8, 512) or 256,
            log_stats_interval=number("VLLM_LOG_STATS_INTERVAL", 5.0, 0.1),
            seed=integer("SIM_SEED", DEFAULT_SEED, 0) or 0,
            redundant_experts=redundant,
        )
        if errors:
            raise ProfileError("invalid worker profile: " + "; ".join(errors))
        return profile
