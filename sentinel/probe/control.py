"""The probe's end of Sentinel's placement control channel (live `rebalance_experts`).

The worker binds two callbacks (`Probe.serve_placement`): `current()` says what
placement it runs, `apply(message)` applies a placement message and returns the
acknowledgement (the test worker's `control.apply_placement_message`). The probe then:

- puts `placement` in every interval report: version, digest, the engine step it came
  in at, the slot shape, and the layers themselves on the first report after the
  version changed (or when the daemon asks with `want_placement`), plus `last`, the
  answer to the newest placement request;
- reads `placement` in the daemon's reply: `{"version": 8, "timeout_s": 10,
  "placement": {...}}` inline, or `{"version": 8, "timeout_s": 10, "href": "/api/..."}`
  when the placement is too large for a reply (then it is fetched with a GET, same
  transport, same token). A version newer than any already handled is applied on a
  thread of its own: staging copies takes time, and the reporter thread keeps
  reporting meanwhile. A version already answered, or in progress, is ignored; the
  worker itself refuses any version not newer than the one it runs, so a message the
  daemon repeats is never applied twice.

Failures to fetch or apply become a `refused` answer with the reason: the daemon fails
the action at once instead of waiting for a timeout.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from sentinel.probe.transport import DeliveryError, Target, get_json

__all__ = ["PlacementApplier", "PlacementChannel", "PlacementSource"]

log = logging.getLogger(__name__)

PlacementSource: TypeAlias = Callable[[], Mapping[str, Any]]
"""What the worker runs: `{"version", "digest", "step", "num_experts", "slots_per_gpu", "layers"}`."""
PlacementApplier: TypeAlias = Callable[[Mapping[str, Any]], Mapping[str, Any]]
"""Applies `{"version", "timeout_s", "placement"}`; returns `{"status", "version", "reason", ...}`."""

_ACK_FIELDS = ("status", "version", "requested_version", "reason", "copies", "copy_bytes", "seconds", "step")
_FETCH_TIMEOUT_S = 10.0


class PlacementChannel:
    """Placement state for reports, and the daemon's placement requests carried out (module doc)."""

    def __init__(self, target: Target, worker: str) -> None:
        self.target = target
        self.worker = worker
        self._current: PlacementSource | None = None
        self._apply: PlacementApplier | None = None
        self._lock = threading.Lock()
        self._sent_version: int | None = None
        self._handled = 0  # the newest requested version answered or being applied
        self._last: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None

    @property
    def bound(self) -> bool:
        return self._current is not None

    def bind(self, current: PlacementSource, apply: PlacementApplier | None) -> None:
        """Serve placements: `current` for reports, `apply` for the daemon's requests (None: report only)."""
        self._current, self._apply = current, apply

    @property
    def last(self) -> dict[str, Any] | None:
        """The answer to the newest placement request (None before the first)."""
        with self._lock:
            return None if self._last is None else dict(self._last)

    def report_entry(self, *, full: bool = False) -> dict[str, Any] | None:
        """The report's `placement` object (None when unbound)."""
        current = self._current
        if current is None:
            return None
        state = current()
        version = int(state["version"])
        entry: dict[str, Any] = {
            "version": version,
            "digest": str(state["digest"]),
            "step": state.get("step"),
            "num_experts": state.get("num_experts"),
            "slots_per_gpu": list(state.get("slots_per_gpu", ())),
        }
        if full or version != self._sent_version:
            entry["layers"] = state.get("layers")
            self._sent_version = version
        last = self.last
        if last is not None:
            entry["last"] = last
        return entry

    def on_reply(self, request: object) -> None:
        """Handle the `placement` of the daemon's reply (ignored when malformed, old or in progress)."""
        if request is None or self._apply is None:
            return
        if not isinstance(request, Mapping):
            log.warning("sentinel probe: ignoring a placement request that is not an object")
            return
        version = request.get("version")
        timeout = request.get("timeout_s", 10.0)
        if type(version) is not int or version < 1:
            log.warning("sentinel probe: ignoring a placement request with version %r", version)
            return
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout):
            log.warning("sentinel probe: ignoring a placement request with timeout_s %r", timeout)
            return
        with self._lock:
            if version <= self._handled:
                return
            self._handled = version
        thread = threading.Thread(
            target=self._carry_out, args=(dict(request), version, float(timeout)), name="sentinel-probe-placement"
        )
        thread.daemon = True
        self._thread = thread
        thread.start()

    def join(self, timeout_s: float) -> None:
        """Wait for a placement being applied (tests, close)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def _carry_out(self, request: dict[str, Any], version: int, timeout_s: float) -> None:
        apply = self._apply
        assert apply is not None
        try:
            message = self._message(request, version, timeout_s)
            ack = dict(apply(message))
        except Exception as exc:  # a malformed message, a failed fetch, a bug in the worker
            reason = str(exc) or type(exc).__name__
            log.warning("sentinel probe: placement version %d not applied: %s", version, reason)
            ack = {"status": "refused", "reason": reason[:1000]}
        answer = {k: ack[k] for k in _ACK_FIELDS if k in ack}
        answer["requested_version"] = version
        answer.setdefault("status", "refused")
        answer.setdefault("reason", "")
        with self._lock:
            if self._last is None or int(self._last.get("requested_version", 0)) <= version:
                self._last = answer
        log.info(
            "sentinel probe: placement version %d for worker %s: %s%s",
            version,
            self.worker,
            answer["status"],
            f" ({answer['reason']})" if answer["reason"] else "",
        )

    def _message(self, request: dict[str, Any], version: int, timeout_s: float) -> dict[str, Any]:
        if "placement" in request:
            return {"version": version, "timeout_s": timeout_s, "placement": request["placement"]}
        href = request.get("href")
        if not isinstance(href, str):
            raise ValueError("the placement request carries neither a placement nor an href")
        try:
            fetched = get_json(self.target, href, _FETCH_TIMEOUT_S)
        except DeliveryError as exc:
            raise ValueError(f"cannot fetch placement version {version}: {exc}") from None
        if fetched.get("version") != version:
            raise ValueError(f"fetched placement has version {fetched.get('version')!r}, expected {version}")
        return {"version": version, "timeout_s": timeout_s, "placement": fetched.get("placement")}
