"""Parameters of the `rebalance_experts` action (a route's `params`), parsed and checked at load.

Kept apart from `rebalance.py` so the settings module can check a route's parameters
without importing the planner.

    routes:
      - match: {alertname: MoEExpertImbalance}
        action: rebalance_experts
        params: {threshold: "0.7", window: 2m, apply_timeout: 10s, min_throughput_ratio: "0.8", max_copies: "64"}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from sentinel.config.base import parse_duration

__all__ = ["REBALANCE_PARAMS", "RebalanceSettings"]

REBALANCE_PARAMS = ("threshold", "window", "apply_timeout", "min_throughput_ratio", "max_copies", "min_reports")


@dataclass(frozen=True)
class RebalanceSettings:
    """How one live rebalance is planned and judged.

    - `threshold`: the measured balancedness to reach (the default rule's 0.7);
    - `window_s`: the routed-token window the plan is made from (the rule's `for:`);
    - `apply_timeout_s`: how long the worker may wait for a step boundary to swap;
    - `verify_timeout_s`: how long the measured balancedness has to rise (remediation.verify_timeout);
    - `min_reports`: probe reports with traffic under the new placement before judging it;
    - `min_throughput_ratio`: routed tokens/s after over before must stay at least this;
    - `max_copies`: at most this many expert copies in one plan (None: no limit).
    """

    threshold: float = 0.7
    window_s: float = 120.0
    apply_timeout_s: float = 10.0
    verify_timeout_s: float = 180.0
    min_reports: int = 3
    min_throughput_ratio: float = 0.8
    max_copies: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str], verify_timeout_s: float = 180.0) -> RebalanceSettings:
        """From a route's params; ValueError naming the parameter."""
        unknown = sorted(set(params) - set(REBALANCE_PARAMS))
        if unknown:
            raise ValueError(f"params: {', '.join(unknown)} not understood by rebalance_experts")

        def number(name: str, default: float, low: float, high: float) -> float:
            raw = params.get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"params.{name}: expected a number, got {raw!r}") from None
            if not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"params.{name}: expected a number in [{low:g}, {high:g}], got {raw!r}")
            return value

        def duration(name: str, default: float) -> float:
            raw = params.get(name)
            if raw is None:
                return default
            value = parse_duration(raw)
            if value <= 0:
                raise ValueError(f"params.{name}: expected a positive duration, got {raw!r}")
            return value

        def count(name: str, low: int) -> int | None:
            raw = params.get(name)
            if raw is None:
                return None
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"params.{name}: expected an integer, got {raw!r}") from None
            if value < low:
                raise ValueError(f"params.{name}: expected an integer >= {low}, got {raw!r}")
            return value

        return cls(
            threshold=number("threshold", 0.7, 0.0, 1.0),
            window_s=duration("window", 120.0),
            apply_timeout_s=duration("apply_timeout", 10.0),
            verify_timeout_s=verify_timeout_s,
            min_reports=count("min_reports", 1) or 3,
            min_throughput_ratio=number("min_throughput_ratio", 0.8, 0.0, 10.0),
            max_copies=count("max_copies", 1),
        )
