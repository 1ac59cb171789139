"""RuleManager over a real Store, EventBus, PromQL engine and SQLite state dir."""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sentinel.config.models import RulesConfig
from sentinel.promql import Engine, Vector
from sentinel.rules.manager import AlertEvent, RuleManager
from sentinel.rules.query import engine_query
from sentinel.rules.rulefile import RuleGroup, load_rule_files
from sentinel.rules.state import Alert, AlertState
from sentinel.store import Store, now_ms
from sentinel.store.events import Event, EventBus
from tests.support import eventually_async as wait_until


class Host:
    """One Sentinel process's worth of rule evaluation: store, bus, engine and manager."""

    def __init__(
        self, state_dir: Path, *, first_subscriber: Callable[[AlertEvent], None] | None = None, **config: Any
    ) -> None:
        state_dir.mkdir(exist_ok=True)
        self.store = Store()
        self.bus = EventBus()
        self.engine = Engine(self.store)
        self.config = RulesConfig(**config)
        self.manager = RuleManager(
            self.store, self.bus, engine_query(self.engine), self.config, state_dir, "http://sentinel.test/"
        )
        self.events: list[tuple[float, AlertEvent]] = []
        self.arrived = asyncio.Event()
        if first_subscriber is not None:
            self.manager.subscribe(first_subscriber)
        self.manager.subscribe(self._record)

    def _record(self, event: AlertEvent) -> None:
        self.events.append((time.perf_counter(), event))
        self.arrived.set()

    def moves(self, alertname: str | None = None) -> list[tuple[str, AlertState, AlertState]]:
        return [
            (e.alert.labels["alertname"], e.transition.previous, e.transition.current)
            for _, e in self.events
            if alertname is None or e.alert.labels["alertname"] == alertname
        ]

    def query(self, expr: str) -> dict[str, float]:
        """Instant query now; {"label=value,...": value}."""
        value = self.engine.instant(expr, now_ms())
        assert isinstance(value, Vector)
        return {",".join(f"{k}={v}" for k, v in s.labels if k != "__name__"): s.value for s in value}

    def alert(self, alertname: str, **labels: str) -> Alert:
        found = [
            a
            for _, rule, a in self.manager.active_alerts()
            if rule.name == alertname and all(a.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) == 1, found
        return found[0]

    def evaluations(self) -> int:
        """Sum over groups of evaluations so far (one sample each in the store)."""
        total = 0
        for series in self.store.select([]):
            if dict(series.labels).get("__name__") == "sentinel_rule_group_last_evaluation_timestamp_seconds":
                total += len(series)
        return total

    def event_evaluations(self, group: str) -> float:
        for sample in self.store.latest("sentinel_rule_group_event_evaluations_total"):
            if dict(sample.labels)["rule_group"].endswith(f";{group}"):
                return sample.value
        return 0.0


def write_rules(path: Path, text: str) -> list[RuleGroup]:
    path.write_text(text)
    return load_rule_files([str(path)])


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[list[Host]]:
    """Hosts made by a test; every manager is closed at the end."""
    made: list[Host] = []
    yield made
    for host in made:
        await host.manager.close()


GPU_RULES = """\
groups:
  - name: gpu
    interval: 100ms
    rules:
      - record: gpu:temp:max
        expr: max(gpu_temp)
      - alert: GpuHot
        expr: gpu_temp > 85
        for: 10m
        labels: {severity: critical}
      - alert: GpuWarm
        expr: gpu_temp > 40
        labels: {severity: info}
        annotations:
          summary: "GPU {{ $labels.gpu }} at {{ $value }} C"
"""


async def test_group_evaluates_on_its_interval_and_writes_alert_and_recording_series(
    tmp_path: Path, hosts: list[Host]
) -> None:
    host = Host(tmp_path / "state")
    hosts.append(host)
    host.store.add("gpu_temp", 90, {"gpu": "0"})
    host.store.add("gpu_temp", 50, {"gpu": "1"})
    await host.manager.apply(write_rules(tmp_path / "gpu.yml", GPU_RULES))
    await wait_until(lambda: host.evaluations() >= 2, what="two evaluations")
    started, before = time.monotonic(), host.evaluations()
    await asyncio.sleep(1.0)
    per_second = (host.evaluations() - before) / (time.monotonic() - started)
    assert 5 <= per_second <= 12, per_second  # 100 ms interval: about 10 a second, no bursts

    assert host.query("gpu:temp:max") == {"": 90}
    assert host.query('ALERTS{alertname="GpuHot"}') == {
        "alertname=GpuHot,alertstate=pending,gpu=0,severity=critical": 1
    }
    assert host.query('ALERTS{alertname="GpuWarm"}') == {
        "alertname=GpuWarm,alertstate=firing,gpu=0,severity=info": 1,
        "alertname=GpuWarm,alertstate=firing,gpu=1,severity=info": 1,
    }
    hot = host.alert("GpuHot", gpu="0")
    assert host.query("ALERTS_FOR_STATE") == {
        "alertname=GpuHot,gpu=0,severity=critical": hot.active_at_ms // 1000,
        "alertname=GpuWarm,gpu=0,severity=info": host.alert("GpuWarm", gpu="0").active_at_ms // 1000,
        "alertname=GpuWarm,gpu=1,severity=info": host.alert("GpuWarm", gpu="1").active_at_ms // 1000,
    }
    assert host.query("sentinel_alerts") == {
        f"rule_group={tmp_path / 'gpu.yml'};gpu,state=pending": 1,
        f"rule_group={tmp_path / 'gpu.yml'};gpu,state=firing": 2,
    }
    (group,) = host.manager.groups
    assert [h.health for h in group.health] == ["ok", "ok", "ok"]


async def test_failing_rule_is_unhealthy_and_the_next_rule_still_runs(tmp_path: Path, hosts: list[Host]) -> None:
    host = Host(tmp_path / "state")
    hosts.append(host)
    data = host.store.appender("test")
    data.add("gpu_temp", 90, gpu="0")
    data.add("gpu_temp", 95, gpu="1")
    data.commit()
    groups = write_rules(
        tmp_path / "r.yml",
        """\
groups:
  - name: mixed
    interval: 100ms
    rules:
      - record: bad:ratio
        expr: gpu_temp / on() gpu_temp
      - alert: GpuHot
        expr: gpu_temp > 85
      - record: gpu:count
        expr: count(gpu_temp)
""",
    )
    await host.manager.apply(groups)
    (group,) = host.manager.groups
    await wait_until(lambda: group.last_evaluation_ms is not None and host.evaluations() >= 2)
    bad, alert, count = group.health
    assert bad.health == "err" and "many-to-many matching not allowed" in bad.last_error
    assert (alert.health, count.health) == ("ok", "ok")
    assert len(host.query('ALERTS{alertstate="firing"}')) == 2 and host.query("gpu:count") == {"": 2}
    assert group.failures_total >= 2
    assert host.query("sentinel_rule_evaluation_failures_total")[f"rule_group={group.key}"] >= 2

    # The data changes so the rule can be evaluated again: it is healthy, its error cleared.
    data = host.store.appender("test")
    data.add("gpu_temp", 90, gpu="0")
    data.commit()
    await wait_until(lambda: bad.health == "ok", what="the rule to recover")
    assert bad.last_error == "" and host.query("bad:ratio") == {"": 1}


EVENT_RULES = """\
groups:
  - name: xid
    interval: 1h
    rules:
      - alert: XidSeen
        expr: gpu_xid_total > 0
        annotations:
          summary: "Xid on GPU {{ $labels.gpu }}"
  - name: unrelated
    interval: 1h
    rules:
      - record: temp:max
        expr: max(gpu_temp)
"""


async def test_event_naming_a_metric_triggers_its_groups_evaluation_within_50ms(
    tmp_path: Path, hosts: list[Host]
) -> None:
    host = Host(tmp_path / "state")
    hosts.append(host)
    await host.manager.apply(write_rules(tmp_path / "r.yml", EVENT_RULES))
    await wait_until(lambda: host.evaluations() >= 2, what="the first evaluation of both groups")
    latencies = []
    for gpu in range(7):
        await asyncio.sleep(0.15)  # past event_min_interval, so each event is its own evaluation
        host.arrived.clear()
        started = time.perf_counter()
        host.store.add("gpu_xid_total", 1, {"gpu": str(gpu)})
        host.bus.publish(Event("xid", "test", {"gpu": str(gpu)}, metrics=("gpu_xid_total",)))
        await asyncio.wait_for(host.arrived.wait(), 2.0)
        received, event = host.events[-1]
        assert event.alert.labels == {"alertname": "XidSeen", "gpu": str(gpu)}
        assert event.transition.current is AlertState.FIRING
        latencies.append(received - started)
    assert statistics.median(latencies) <= 0.050, latencies
    await wait_until(lambda: host.event_evaluations("xid") == 7)
    assert host.event_evaluations("unrelated") == 0  # it reads no metric the events named


async def test_event_for_a_metric_no_group_reads_triggers_nothing(tmp_path: Path, hosts: list[Host]) -> None:
    host = Host(tmp_path / "state")
    hosts.append(host)
    await host.manager.apply(write_rules(tmp_path / "r.yml", EVENT_RULES))
    await wait_until(lambda: host.evaluations() >= 2)
    host.store.add("gpu_xid_total", 1, {"gpu": "0"})
    host.bus.publish(Event("log", "test", metrics=("sentinel_log_events_total",)))
    host.bus.publish(Event("log", "test"))
    await asyncio.sleep(0.3)
    assert host.events == [] and host.evaluations() == 2


async def test_event_storm_causes_at_most_one_evaluation_per_100ms_and_the_last_event_is_seen(
    tmp_path: Path, hosts: list[Host]
) -> None:
    host = Host(tmp_path / "state", event_min_interval=0.1)
    hosts.append(host)
    await host.manager.apply(write_rules(tmp_path / "r.yml", EVENT_RULES))
    await wait_until(lambda: host.evaluations() >= 2)
    storm_s, published = 1.0, 0
    started = time.monotonic()
    while time.monotonic() - started < storm_s:
        host.bus.publish(Event("xid", "test", metrics=("gpu_xid_total",)))
        published += 1
        await asyncio.sleep(0.002)
    # The last event of the storm carries the data that fires the alert.
    last = time.perf_counter()
    host.store.add("gpu_xid_total", 1, {"gpu": "3"})
    host.bus.publish(Event("xid", "test", metrics=("gpu_xid_total",)))
    await asyncio.wait_for(host.arrived.wait(), 2.0)
    assert host.events[-1][0] - last <= 0.5
    elapsed = time.monotonic() - started
    evaluations = host.event_evaluations("xid")
    assert published >= 100
    assert 3 <= evaluations <= elapsed / 0.1 + 2, (evaluations, elapsed)


async def test_transitions_reach_subscribers_with_labels_annotations_and_value(
    tmp_path: Path, hosts: list[Host]
) -> None:
    failing: list[AlertEvent] = []

    def broken(event: AlertEvent) -> None:
        failing.append(event)
        raise RuntimeError("a broken subscriber must not stop the others")

    host = Host(tmp_path / "state", first_subscriber=broken)
    hosts.append(host)
    host.store.add("gpu_temp", 91.5, {"gpu": "2"})
    await host.manager.apply(write_rules(tmp_path / "gpu.yml", GPU_RULES))
    await wait_until(lambda: len(host.moves("GpuWarm")) >= 2, what="GpuWarm transitions")
    warm = [e for _, e in host.events if e.alert.labels["alertname"] == "GpuWarm"]
    assert [(e.transition.previous, e.transition.current) for e in warm[:2]] == [
        (AlertState.INACTIVE, AlertState.PENDING),
        (AlertState.PENDING, AlertState.FIRING),
    ]
    firing = warm[1]
    assert firing.alert.labels == {"alertname": "GpuWarm", "gpu": "2", "severity": "info"}
    assert firing.alert.annotations == {"summary": "GPU 2 at 91.5 C"}
    assert firing.alert.value == 91.5 and firing.alert.state is AlertState.FIRING
    assert firing.rule.name == "GpuWarm" and firing.group == "gpu" and firing.group_file == str(tmp_path / "gpu.yml")
    assert len(failing) == len(host.events)


RESTART_RULES = """\
groups:
  - name: restart
    interval: 100ms
    rules:
      - alert: SlowBurn
        expr: gpu_temp > 85
        for: 10s
      - alert: Hot
        expr: gpu_temp > 40
"""


async def _first_life(tmp_path: Path, hosts: list[Host], **config: Any) -> tuple[Alert, Alert, int]:
    """Run until SlowBurn has been pending a while and Hot fires; returns both and the close time."""
    first = Host(tmp_path / "state", **config)
    hosts.append(first)
    first.store.add("gpu_temp", 90, {"gpu": "0"})
    await first.manager.apply(write_rules(tmp_path / "r.yml", RESTART_RULES))
    await wait_until(lambda: (AlertState.PENDING, AlertState.FIRING) in [m[1:] for m in first.moves("Hot")])
    await asyncio.sleep(1.5)  # time spent pending before the outage
    pending, firing = first.alert("SlowBurn"), first.alert("Hot")
    assert pending.state is AlertState.PENDING and firing.state is AlertState.FIRING
    await first.manager.close()
    return pending, firing, now_ms()


async def test_restart_keeps_pending_active_since_and_firing_state_without_new_notifications(
    tmp_path: Path, hosts: list[Host]
) -> None:
    config = {"for_grace_period": 1.0, "outage_tolerance": 60.0}
    pending, firing, closed_at = await _first_life(tmp_path, hosts, **config)
    await asyncio.sleep(0.5)  # the outage

    second = Host(tmp_path / "state", **config)  # a new process: empty store, same state dir
    hosts.append(second)
    second.store.add("gpu_temp", 90, {"gpu": "0"})
    restarted_at = now_ms()
    await second.manager.apply(write_rules(tmp_path / "r.yml", RESTART_RULES))
    await wait_until(lambda: second.evaluations() >= 5)

    restored = second.alert("SlowBurn")
    assert restored.state is AlertState.PENDING
    outage = restarted_at - closed_at
    # Time spent pending before the outage still counts; only the outage is added.
    spent_before = closed_at - pending.active_at_ms
    assert spent_before >= 1400
    assert pending.active_at_ms < restored.active_at_ms <= pending.active_at_ms + outage + 300
    assert restored.active_at_ms <= restarted_at - 1400  # not reset to the restart
    assert second.query('ALERTS_FOR_STATE{alertname="SlowBurn"}') == {
        "alertname=SlowBurn,gpu=0": restored.active_at_ms // 1000
    }
    still = second.alert("Hot")
    assert still.state is AlertState.FIRING and still.active_at_ms == firing.active_at_ms
    assert still.fired_at_ms == firing.fired_at_ms
    assert second.moves() == []  # neither a new pending nor a second firing notification
    assert second.query('ALERTS{alertname="Hot"}') == {"alertname=Hot,alertstate=firing,gpu=0": 1}


async def test_outage_longer_than_the_tolerance_starts_alerts_afresh(tmp_path: Path, hosts: list[Host]) -> None:
    config = {"for_grace_period": 1.0, "outage_tolerance": 0.3}
    pending, _, _ = await _first_life(tmp_path, hosts, **config)
    await asyncio.sleep(0.8)

    second = Host(tmp_path / "state", **config)
    hosts.append(second)
    second.store.add("gpu_temp", 90, {"gpu": "0"})
    restarted_at = now_ms()
    await second.manager.apply(write_rules(tmp_path / "r.yml", RESTART_RULES))
    await wait_until(lambda: len(second.moves("Hot")) >= 2)
    assert second.alert("SlowBurn").active_at_ms >= restarted_at > pending.active_at_ms
    assert second.moves("SlowBurn") == [("SlowBurn", AlertState.INACTIVE, AlertState.PENDING)]
    assert second.moves("Hot") == [
        ("Hot", AlertState.INACTIVE, AlertState.PENDING),
        ("Hot", AlertState.PENDING, AlertState.FIRING),
    ]


async def test_restart_gives_each_rule_of_a_shared_name_only_its_own_alerts(tmp_path: Path, hosts: list[Host]) -> None:
    rules = """\
groups:
  - name: split
    interval: 100ms
    rules:
      - alert: GpuTemp
        expr: gpu_temp > 80
        labels: {severity: warning}
      - alert: GpuTemp
        expr: gpu_temp > 90
        labels: {severity: critical}
"""
    first = Host(tmp_path / "state", for_grace_period=1.0)
    hosts.append(first)
    first.store.add("gpu_temp", 85, {"gpu": "0"})
    await first.manager.apply(write_rules(tmp_path / "r.yml", rules))
    await wait_until(lambda: len(first.moves()) >= 2)
    await first.manager.close()

    second = Host(tmp_path / "state", for_grace_period=1.0)
    hosts.append(second)
    second.store.add("gpu_temp", 85, {"gpu": "0"})
    await second.manager.apply(write_rules(tmp_path / "r.yml", rules))
    await wait_until(lambda: second.evaluations() >= 3)
    # The critical rule did not adopt (and then resolve) the warning's alert.
    assert second.moves() == []
    (group,) = second.manager.groups
    assert [len(h.active) for h in group.health] == [1, 0]


async def test_reload_carries_state_of_unchanged_rules_and_ends_series_of_removed_ones(
    tmp_path: Path, hosts: list[Host]
) -> None:
    host = Host(tmp_path / "state")
    hosts.append(host)
    host.store.add("gpu_temp", 90, {"gpu": "0"})
    path = tmp_path / "r.yml"
    await host.manager.apply(
        write_rules(
            path,
            """\
groups:
  - name: keep
    interval: 100ms
    rules:
      - alert: SlowBurn
        expr: gpu_temp > 85
        for: 10m
      - alert: Edited
        expr: gpu_temp > 85
        for: 10m
      - record: keep:extra
        expr: max(gpu_temp)
  - name: gone
    interval: 100ms
    rules:
      - record: gone:temp
        expr: max(gpu_temp)
      - alert: GoneHot
        expr: gpu_temp > 40
""",
        )
    )
    await wait_until(lambda: host.evaluations() >= 4 and len(host.query("gone:temp")) == 1)
    kept = host.alert("SlowBurn")
    edited = host.alert("Edited")
    assert host.query('ALERTS{alertname="GoneHot"}') and host.query("keep:extra")
    await asyncio.sleep(0.2)

    await host.manager.apply(
        write_rules(
            path,
            """\
groups:
  - name: keep
    interval: 100ms
    rules:
      - alert: SlowBurn
        expr: gpu_temp > 85
        for: 10m
      - alert: Edited
        expr: gpu_temp > 86
        for: 10m
""",
        )
    )
    before = host.evaluations()
    await wait_until(lambda: host.evaluations() >= before + 2)
    assert host.alert("SlowBurn").active_at_ms == kept.active_at_ms  # carried over
    assert host.alert("Edited").active_at_ms > edited.active_at_ms  # a changed rule starts over
    assert [g.group.name for g in host.manager.groups] == ["keep"]
    assert host.query("gone:temp") == {}
    assert host.query('ALERTS{alertname="GoneHot"}') == {}
    assert host.query("keep:extra") == {}  # a rule removed from a kept group ends too
    assert len(host.query('ALERTS{alertname="SlowBurn"}')) == 1


async def test_corrupt_state_file_is_moved_aside_and_rules_keep_evaluating(
    tmp_path: Path, hosts: list[Host], caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "alerts.sqlite").write_bytes(b"this is not a SQLite database" * 100)
    host = Host(state)
    hosts.append(host)
    host.store.add("gpu_temp", 90, {"gpu": "0"})
    await host.manager.apply(write_rules(tmp_path / "gpu.yml", GPU_RULES))
    await wait_until(lambda: len(host.moves("GpuWarm")) == 2)
    assert "moved it aside" in caplog.text
    (moved,) = state.glob("alerts.sqlite.corrupt-*")
    assert moved.read_bytes().startswith(b"this is not a SQLite database")
    # A fresh file took its place: alert state survives restarts again.
    with sqlite3.connect(state / "alerts.sqlite") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
