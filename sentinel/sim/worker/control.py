"""The worker's side of a placement message: parse it, apply it, acknowledge what runs.

This is the function API Sentinel's live rebalance reaches through the probe's control
channel (docs/expert-balancing.md: the daemon's reply to a report carries a placement,
the probe hands it to `apply_placement_message` on a thread of its own, and the next
report carries the acknowledgement); `POST /admin/placement` uses it too. A message:

    {"version": 7, "timeout_s": 10, "placement": {"num_experts": 16, "layers": [...]}}

`version` is optional (default: the next), `timeout_s` how long the worker waits for a
step boundary (default 10 s). The acknowledgement is `PlacementResult.to_json()` plus
`digest`, the fingerprint of the placement the worker runs after the call, so the
daemon can check it is the one it planned (or, after a refusal or a timeout, the old
one). `placement_ack` gives the same for every report, with no message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sentinel.moe import Placement, PlacementError
from sentinel.sim.worker.engine import ServingEngine

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_TIMEOUT_S",
    "MessageError",
    "apply_placement_message",
    "placement_ack",
    "placement_state",
    "serve_placement_through",
]

DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 300.0


class MessageError(ValueError):
    """A placement message that is not one; the text names the field."""


def parse_placement_message(message: object) -> tuple[Placement, int | None, float]:
    """(placement, version or None, timeout in seconds) of a message; `MessageError` if malformed."""
    if not isinstance(message, Mapping):
        raise MessageError(f"placement message: expected an object, got {type(message).__name__}")
    try:
        placement = Placement.from_json(message.get("placement"), "placement")
    except PlacementError as exc:
        raise MessageError(str(exc)) from None
    version = message.get("version")
    if version is not None and (type(version) is not int or version < 1):
        raise MessageError(f"version: expected a positive integer (or absent: the next one), got {version!r}")
    timeout = message.get("timeout_s", DEFAULT_TIMEOUT_S)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_TIMEOUT_S
    ):
        raise MessageError(f"timeout_s: expected seconds in (0, {MAX_TIMEOUT_S:g}], got {timeout!r}")
    return placement, version, float(timeout)


def apply_placement_message(engine: ServingEngine, message: object) -> dict[str, Any]:
    """Apply a placement message and return the acknowledgement (blocks up to its timeout).

    Raises `MessageError` for a malformed message; every other outcome (applied,
    refused, timed out) is an acknowledgement. Not on the engine thread.
    """
    placement, version, timeout = parse_placement_message(message)
    result = engine.apply_placement(placement, version=version, timeout_s=timeout)
    return {**result.to_json(), "digest": engine.ep.placement.digest()}


def placement_ack(engine: ServingEngine) -> dict[str, Any]:
    """What the worker runs now: version, the step it came in at, and its digest."""
    return {
        "version": engine.placement_version,
        "step": engine.placement_step,
        "digest": engine.ep.placement.digest(),
    }


def placement_state(engine: ServingEngine) -> dict[str, Any]:
    """What the probe reports every interval: `placement_ack` plus the slot shape and the layers."""
    placement = engine.ep.placement
    return {
        **placement_ack(engine),
        "num_experts": placement.num_experts,
        "slots_per_gpu": list(placement.slots_per_gpu),
        "layers": placement.to_json()["layers"],
    }


def serve_placement_through(probe: object, engine: ServingEngine) -> bool:
    """Let Sentinel's live rebalance reach `engine` through an attached probe; False if it cannot."""
    serve = getattr(probe, "serve_placement", None)
    if not callable(serve):
        return False
    serve(lambda: placement_state(engine), lambda message: apply_placement_message(engine, message))
    return True
