"""Remediation reports: what the remediation engine tells people it did, and their wording."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["OUTCOMES", "ActionReport", "Outcome", "describe"]

Outcome = Literal["started", "succeeded", "failed", "skipped", "would_act", "needs_human"]
OUTCOMES: tuple[Outcome, ...] = ("started", "succeeded", "failed", "skipped", "would_act", "needs_human")


@dataclass(frozen=True)
class ActionReport:
    """One remediation step on one worker, as the remediation engine reports it."""

    worker: str
    action: str
    outcome: Outcome
    timestamp_ms: int
    from_profile: str | None = None
    to_profile: str | None = None
    alertname: str | None = None
    fingerprint: str | None = None
    detail: str = ""
    seconds_to_healthy: float | None = None
    severity: str = "info"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActionReport:
        return cls(**data)

    @property
    def dedup_key(self) -> str:
        """One report is one (worker, action, outcome) at one moment; a retry of the caller repeats it."""
        return f"action:{self.worker}:{self.action}:{self.outcome}:{self.timestamp_ms}"


# (infinitive, past, progressive) with {w} for the worker; the sentence reads like a
# person's note in a channel: "reduced batch on qwen3 from full to reduced after CudaOOM".
_VERBS: dict[str, tuple[str, str, str]] = {
    "restart": ("restart {w}", "restarted {w}", "restarting {w}"),
    "reduce_batch": ("reduce batch on {w}", "reduced batch on {w}", "reducing batch on {w}"),
    "quantized_fallback": (
        "fall back to a quantized profile on {w}",
        "fell back to a quantized profile on {w}",
        "falling back to a quantized profile on {w}",
    ),
    "restore": ("restore {w}", "restored {w}", "restoring {w}"),
    "stop": ("stop {w}", "stopped {w}", "stopping {w}"),
    "exec": ("run the command for {w}", "ran the command for {w}", "running the command for {w}"),
    "notify_only": ("notify about {w}", "notified about {w}", "notifying about {w}"),
}


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{math.floor(value + 0.5):d} s"


def describe(report: ActionReport) -> str:
    """One plain sentence: "reduced batch on qwen3 from full to reduced after CudaOOM; healthy again in 41 s"."""
    generic = report.action.replace("_", " ") + " on {w}"
    infinitive, past, progressive = _VERBS.get(report.action, (generic, generic, generic))
    verbs = {
        "started": progressive,
        "succeeded": past,
        "failed": "failed to " + infinitive,
        "skipped": "skipped: " + infinitive,
        "would_act": "would " + infinitive,
        "needs_human": "needs a human: could not " + infinitive,
    }
    # An outcome from a newer remediation engine still makes a readable line.
    verb = verbs.get(report.outcome, f"{report.outcome}: {infinitive}")
    text = verb.format(w=report.worker)
    if report.from_profile and report.to_profile and report.from_profile != report.to_profile:
        text += f" from {report.from_profile} to {report.to_profile}"
    if report.alertname:
        text += f" after {report.alertname}"
    if report.outcome == "would_act":
        text += " (observe mode)"
    if report.outcome == "succeeded" and report.seconds_to_healthy is not None:
        text += f"; healthy again in {_seconds(report.seconds_to_healthy)}"
    if report.detail and report.outcome != "succeeded":
        text += f": {report.detail}"
    return text
