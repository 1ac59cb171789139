"""The fleet breaker: the same alert on too many hosts at once is systemic, not local.

A driver rollout, a shared-storage stall or a network fault fires the same alert on
many hosts within minutes; healing each host by itself then restarts the whole fleet at
once. The leader watches every host's firing alerts and, when an alert started on more
than `share` of the live hosts (and on at least `min_hosts`) within `window`, opens
`breaker/<alert>`. Every host then refuses actions for that alert (the budget's
transaction compares the key, so no slot is granted after it opened) and the leader
alone exports `sentinel_fleet_breaker_open{alert}` so exactly one page goes out.

It closes by itself once the alert has fired on fewer hosts than the trip threshold for
a whole window, or when an operator resumes it (`sentinel fleet resume ALERT`): then
hosts act again, and only alerts that start after the resume can trip it anew.

The decision logic here is pure (state in, decisions out) and tested as such; the
leader (leader.py) applies the decisions with fenced compare-and-swap writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

from sentinel.fleet.config import BreakerConfig
from sentinel.fleet.status import HostStatus

__all__ = ["BreakerDecision", "BreakerRecord", "BreakerTracker"]


class BreakerRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    alert: str
    state: Literal["open", "resumed"] = "open"
    opened_at: float
    hosts: tuple[str, ...] = ()
    live_hosts: int = 0
    share: float = 0.0
    resumed_at: float | None = None
    resumed_by: str | None = None


@dataclass(frozen=True)
class BreakerDecision:
    kind: Literal["open", "close"]
    alert: str
    hosts: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class BreakerTracker:
    """Onsets of each alert on each host, as the leader saw them."""

    config: BreakerConfig
    onsets: dict[str, dict[str, float]] = field(default_factory=dict)
    quiet_since: dict[str, float] = field(default_factory=dict)

    def observe(self, statuses: Mapping[str, HostStatus], now: float) -> None:
        for host, status in statuses.items():
            for firing in status.alerts:
                self.onsets.setdefault(firing.name, {})[host] = firing.active_at
        horizon = now - self.config.window
        for alert in list(self.onsets):
            hosts = {h: t for h, t in self.onsets[alert].items() if t >= horizon}
            if hosts:
                self.onsets[alert] = hosts
            else:
                del self.onsets[alert]

    def affected(self, alert: str, now: float, since: float = 0.0) -> list[str]:
        """Hosts where `alert` started within the window (and after `since`)."""
        horizon = max(now - self.config.window, since)
        return sorted(h for h, t in self.onsets.get(alert, {}).items() if t >= horizon)

    def trips(self, count: int, live_hosts: int) -> bool:
        return count >= self.config.min_hosts and count > self.config.share * max(live_hosts, 1)

    def decide(
        self, statuses: Mapping[str, HostStatus], records: Mapping[str, BreakerRecord], now: float
    ) -> list[BreakerDecision]:
        self.observe(statuses, now)
        live = len(statuses)
        decisions = []
        for alert in sorted(set(self.onsets) | set(records)):
            record = records.get(alert)
            since = (record.resumed_at or 0.0) if record is not None and record.state == "resumed" else 0.0
            affected = self.affected(alert, now, since)
            if (record is None or record.state == "resumed") and self.trips(len(affected), live):
                decisions.append(
                    BreakerDecision(
                        "open",
                        alert,
                        tuple(affected),
                        f"{alert} started on {len(affected)} of {live} hosts within {self.config.window:.0f}s",
                    )
                )
                self.quiet_since.pop(alert, None)
                continue
            if record is None:
                continue
            firing = [h for h, s in statuses.items() if any(a.name == alert for a in s.alerts)]
            if self.trips(len(firing), live) or self.trips(len(affected), live):
                self.quiet_since.pop(alert, None)
                continue
            quiet = self.quiet_since.setdefault(alert, now)
            if now - quiet >= self.config.window:
                decisions.append(
                    BreakerDecision(
                        "close",
                        alert,
                        tuple(firing),
                        f"{alert} has been below the trip threshold for {self.config.window:.0f}s",
                    )
                )
                self.quiet_since.pop(alert, None)
        return decisions
