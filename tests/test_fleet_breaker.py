"""The fleet breaker's decisions, as a pure function of host statuses and time."""

from __future__ import annotations

from sentinel.fleet.breaker import BreakerRecord, BreakerTracker
from sentinel.fleet.config import BreakerConfig
from sentinel.fleet.status import AlertStatus, HostStatus

CFG = BreakerConfig(share=0.5, window=300, min_hosts=3)


def fleet(firing: dict[str, float], hosts: int = 6, alert: str = "EngineStalled") -> dict[str, HostStatus]:
    """`hosts` live hosts; those in `firing` report `alert` active since the given time."""
    out = {}
    for i in range(hosts):
        name = f"h{i}"
        alerts = (AlertStatus(name=alert, active_at=firing[name]),) if name in firing else ()
        out[name] = HostStatus(host=name, alerts=alerts)
    return out


def test_trips_when_more_than_the_share_start_within_the_window() -> None:
    t = BreakerTracker(CFG)
    now = 10_000.0
    three = {"h0": now - 10, "h1": now - 20, "h2": now - 30}
    assert t.decide(fleet(three), {}, now) == []  # 3 of 6 is not more than half
    four = {**three, "h3": now - 5}
    [d] = t.decide(fleet(four), {}, now)
    assert (d.kind, d.alert, d.hosts) == ("open", "EngineStalled", ("h0", "h1", "h2", "h3"))
    assert "started on 4 of 6 hosts within 300s" in d.reason


def test_never_trips_below_min_hosts_even_on_a_tiny_fleet() -> None:
    t = BreakerTracker(CFG)
    now = 1000.0
    assert t.decide(fleet({"h0": now, "h1": now}, hosts=2), {}, now) == []


def test_old_onsets_do_not_count_as_correlated() -> None:
    t = BreakerTracker(CFG)
    now = 10_000.0
    firing = {"h0": now - 4000, "h1": now - 3000, "h2": now - 10, "h3": now - 10}
    assert t.decide(fleet(firing), {}, now) == []


def test_hosts_that_recovered_quickly_still_count_within_the_window() -> None:
    t = BreakerTracker(CFG)
    now = 10_000.0
    t.decide(fleet({"h0": now - 60, "h1": now - 50}), {}, now - 40)  # seen, then healed
    [d] = t.decide(fleet({"h2": now - 5, "h3": now - 3}), {}, now)
    assert d.kind == "open" and set(d.hosts) == {"h0", "h1", "h2", "h3"}


def test_closes_after_a_whole_quiet_window_and_not_before() -> None:
    t = BreakerTracker(CFG)
    record = {"EngineStalled": BreakerRecord(alert="EngineStalled", opened_at=0.0, hosts=("h0", "h1", "h2", "h3"))}
    now = 10_000.0
    firing = {"h0": now - 400, "h1": now - 400, "h2": now - 400, "h3": now - 400}
    assert t.decide(fleet(firing), record, now) == []  # still firing on 4 of 6: stays open
    assert t.decide(fleet({}), record, now + 1) == []  # cleared: the quiet window starts
    assert t.decide(fleet({}), record, now + 200) == []
    [d] = t.decide(fleet({}), record, now + 302)
    assert d.kind == "close"


def test_after_an_operator_resume_only_new_onsets_can_trip_it_again() -> None:
    t = BreakerTracker(CFG)
    now = 10_000.0
    resumed = {
        "EngineStalled": BreakerRecord(
            alert="EngineStalled", state="resumed", opened_at=now - 100, resumed_at=now - 50, hosts=()
        )
    }
    before = {"h0": now - 90, "h1": now - 80, "h2": now - 70, "h3": now - 60}
    assert [d.kind for d in t.decide(fleet(before), resumed, now)] == []
    after = {"h0": now - 10, "h1": now - 9, "h2": now - 8, "h3": now - 7}
    [d] = t.decide(fleet(after), resumed, now)
    assert d.kind == "open"


def test_each_alert_is_judged_on_its_own() -> None:
    t = BreakerTracker(CFG)
    now = 10_000.0
    statuses = fleet({"h0": now, "h1": now, "h2": now, "h3": now})
    statuses["h5"] = HostStatus(host="h5", alerts=(AlertStatus(name="GPULost", active_at=now),))
    assert [(d.kind, d.alert) for d in t.decide(statuses, {}, now)] == [("open", "EngineStalled")]
