"""The Prometheus-shaped HTTP API of a real daemon subprocess, and rule reloads on SIGHUP."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import DaemonProcess
from tests.support import eventually

RULES = """\
groups:
  - name: gpus
    interval: 500ms
    rules:
      - record: gpu:utilization:avg
        expr: avg(sentinel_gpu_utilization_ratio)
      - alert: GpuUp
        expr: sentinel_gpu_up == 1
        labels: {severity: info}
        annotations:
          summary: "GPU {{ $labels.gpu }} is up"
      - alert: GpuZeroUpLong
        expr: sentinel_gpu_up{gpu="0"} == 1
        for: 1h
        keep_firing_for: 5m
      - alert: NeverFires
        expr: sentinel_gpu_up == 7
"""

ALERTING_RULE_KEYS = {
    "name",
    "query",
    "duration",
    "keepFiringFor",
    "labels",
    "annotations",
    "alerts",
    "health",
    "evaluationTime",
    "lastEvaluation",
    "type",
    "state",
}
RECORDING_RULE_KEYS = {"name", "query", "labels", "health", "evaluationTime", "lastEvaluation", "type"}
GROUP_KEYS = {"name", "file", "rules", "interval", "limit", "evaluationTime", "lastEvaluation"}
ALERT_KEYS = {"labels", "annotations", "state", "activeAt", "value"}


def start_daemon(tmp_path: Path, rules: str = RULES) -> DaemonProcess:
    rule_file = tmp_path / "gpu.rules.yml"
    rule_file.write_text(rules)
    config = tmp_path / "sentinel.yaml"
    config.write_text(f"collectors:\n  nvml:\n    kernel_log: 'off'\nrules:\n  files: [{json.dumps(str(rule_file))}]\n")
    return DaemonProcess("-c", str(config), "--simulate", "healthy-8gpu", state_dir=tmp_path / "state")


def call(daemon: DaemonProcess, path: str, form: dict[str, str] | None = None, **params: str) -> tuple[int, Any]:
    """GET with query parameters, or POST `form` url-encoded; returns (status, decoded JSON)."""
    url = daemon.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.headers.get("Content-Type", "").startswith("application/json")
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        assert err.headers.get("Content-Type", "").startswith("application/json"), err.read()
        return err.code, json.loads(err.read())


def rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    process = start_daemon(tmp_path_factory.mktemp("api"))

    def all_rules_evaluated() -> bool:
        _, body = call(process, "/api/v1/rules")
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        return bool(rules) and all(r["health"] == "ok" for r in rules) and len(rules[1]["alerts"]) == 8

    eventually(all_rules_evaluated)
    yield process
    process.stop()


def assert_success(status: int, body: Any) -> Any:
    assert status == 200 and body["status"] == "success", body
    return body["data"]


def assert_error(status: int, body: Any, expected_status: int, error_type: str) -> str:
    assert status == expected_status, body
    assert set(body) == {"status", "errorType", "error"}, body
    assert body["status"] == "error" and body["errorType"] == error_type
    assert isinstance(body["error"], str) and body["error"]
    return str(body["error"])


# -- /api/v1/query -------------------------------------------------------------------------------


def test_instant_query_returns_a_vector_with_string_values(daemon: DaemonProcess) -> None:
    at = time.time()
    data = assert_success(*call(daemon, "/api/v1/query", query='sentinel_gpu_up{gpu=~"[0-3]"}', time=f"{at:.3f}"))
    assert data["resultType"] == "vector"
    assert sorted(r["metric"]["gpu"] for r in data["result"]) == ["0", "1", "2", "3"]
    for row in data["result"]:
        assert set(row) == {"metric", "value"}
        assert row["metric"]["__name__"] == "sentinel_gpu_up"
        ts, value = row["value"]
        assert isinstance(ts, float) and ts == pytest.approx(at, abs=0.001)
        assert value == "1"


def test_instant_query_by_post_form(daemon: DaemonProcess) -> None:
    data = assert_success(*call(daemon, "/api/v1/query", form={"query": "count(sentinel_gpu_up)", "time": "1"}))
    assert data["resultType"] == "vector"
    # At t=1 s the store has nothing: count() of nothing is an empty vector.
    assert data["result"] == []
    data = assert_success(*call(daemon, "/api/v1/query", form={"query": "count(sentinel_gpu_up)"}))
    assert [row["value"][1] for row in data["result"]] == ["8"]
    assert data["result"][0]["metric"] == {}


def test_instant_query_of_scalars_and_strings(daemon: DaemonProcess) -> None:
    data = assert_success(*call(daemon, "/api/v1/query", query="1 + 1.5", time="1700000000.5"))
    assert data == {"resultType": "scalar", "result": [1700000000.5, "2.5"]}
    data = assert_success(*call(daemon, "/api/v1/query", query='"up"', time="1700000000"))
    assert data == {"resultType": "string", "result": [1700000000, "up"]}
    data = assert_success(*call(daemon, "/api/v1/query", query="0.00001", time="1700000000"))
    assert data["result"][1] == "0.00001"  # Go's float text, as Prometheus writes it
    data = assert_success(*call(daemon, "/api/v1/query", query="-1/0", time="1700000000"))
    assert data["result"][1] == "-Inf"


def test_recording_rule_output_is_queryable(daemon: DaemonProcess) -> None:
    data = assert_success(*call(daemon, "/api/v1/query", query="gpu:utilization:avg"))
    (row,) = data["result"]
    assert row["metric"] == {"__name__": "gpu:utilization:avg"}
    assert 0 <= float(row["value"][1]) <= 1


def test_alerts_series_are_queryable(daemon: DaemonProcess) -> None:
    data = assert_success(*call(daemon, "/api/v1/query", query='ALERTS{alertname="GpuZeroUpLong"}'))
    (row,) = data["result"]
    assert row["metric"]["alertstate"] == "pending" and row["metric"]["gpu"] == "0"


# -- /api/v1/query_range -------------------------------------------------------------------------


def test_range_query_returns_a_matrix_on_the_step_grid(daemon: DaemonProcess) -> None:
    def three_points() -> tuple[dict[str, str], Any] | None:
        end = float(int(time.time()))
        params = {"query": 'sentinel_gpu_up{gpu="0"}', "start": str(end - 2), "end": str(end), "step": "1s"}
        data = assert_success(*call(daemon, "/api/v1/query_range", **params))
        full = len(data["result"]) == 1 and len(data["result"][0]["values"]) == 3
        return (params, data) if full else None

    params, data = eventually(three_points, timeout=5)  # the daemon may be younger than the range
    assert data["resultType"] == "matrix"
    (series,) = data["result"]
    assert set(series) == {"metric", "values"}
    assert series["metric"]["gpu"] == "0"
    start = float(params["start"])
    assert [ts for ts, _ in series["values"]] == [start, start + 1, start + 2]
    assert {value for _, value in series["values"]} == {"1"}
    posted = assert_success(*call(daemon, "/api/v1/query_range", form={**params, "step": "1"}))
    assert posted == data


# -- /api/v1/rules and /api/v1/alerts ------------------------------------------------------------------


def test_rules_lists_groups_and_rules_in_prometheus_shape(daemon: DaemonProcess) -> None:
    data = assert_success(*call(daemon, "/api/v1/rules"))
    (group,) = data["groups"]
    assert set(group) == GROUP_KEYS
    assert group["name"] == "gpus" and group["file"].endswith("gpu.rules.yml")
    assert group["interval"] == 0.5 and group["limit"] == 0
    rules = {r["name"]: r for r in group["rules"]}
    assert list(rules) == ["gpu:utilization:avg", "GpuUp", "GpuZeroUpLong", "NeverFires"]
    assert set(rules["gpu:utilization:avg"]) == RECORDING_RULE_KEYS
    assert rules["gpu:utilization:avg"]["type"] == "recording"
    for name in ("GpuUp", "GpuZeroUpLong", "NeverFires"):
        assert set(rules[name]) == ALERTING_RULE_KEYS, name
        assert rules[name]["type"] == "alerting" and rules[name]["health"] == "ok"
        rfc3339(rules[name]["lastEvaluation"])
    up = rules["GpuUp"]
    assert up["state"] == "firing" and up["duration"] == 0 and up["labels"] == {"severity": "info"}
    assert up["annotations"] == {"summary": "GPU {{ $labels.gpu }} is up"}  # the rule's own text
    assert len(up["alerts"]) == 8
    long = rules["GpuZeroUpLong"]
    assert long["state"] == "pending" and long["duration"] == 3600 and long["keepFiringFor"] == 300
    assert rules["NeverFires"]["state"] == "inactive" and rules["NeverFires"]["alerts"] == []
    only_alerts = assert_success(*call(daemon, "/api/v1/rules", type="alert"))
    assert [r["name"] for r in only_alerts["groups"][0]["rules"]] == ["GpuUp", "GpuZeroUpLong", "NeverFires"]
    only_records = assert_success(*call(daemon, "/api/v1/rules", type="record"))
    assert [r["name"] for r in only_records["groups"][0]["rules"]] == ["gpu:utilization:avg"]


def test_alerts_lists_pending_and_firing_alerts(daemon: DaemonProcess) -> None:
    data = assert_success(*call(daemon, "/api/v1/alerts"))
    alerts = data["alerts"]
    assert len(alerts) == 9
    for alert in alerts:
        assert set(alert) == ALERT_KEYS
        assert rfc3339(alert["activeAt"]).timestamp() <= time.time()
        assert alert["value"] == "1"
    firing = [a for a in alerts if a["state"] == "firing"]
    assert len(firing) == 8
    assert {a["labels"]["alertname"] for a in firing} == {"GpuUp"}
    gpu3 = next(a for a in firing if a["labels"]["gpu"] == "3")
    assert gpu3["annotations"] == {"summary": "GPU 3 is up"}
    assert gpu3["labels"]["severity"] == "info" and "__name__" not in gpu3["labels"]
    (pending,) = [a for a in alerts if a["state"] == "pending"]
    assert pending["labels"]["alertname"] == "GpuZeroUpLong"


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "fragment"),
    [
        ("/api/v1/query", {}, 'invalid parameter "query"'),
        ("/api/v1/query", {"query": "sum(up"}, 'invalid parameter "query"'),
        ("/api/v1/query", {"query": "up", "time": "yesterday"}, 'invalid parameter "time"'),
        ("/api/v1/query", {"query": "up", "time": "inf"}, 'invalid parameter "time"'),
        ("/api/v1/query", {"query": "up @ 1e19"}, 'invalid parameter "query"'),
        ("/api/v1/query_range", {"query": "up", "start": "1", "end": "2"}, "step"),
        ("/api/v1/query_range", {"query": "up", "start": "1", "end": "2", "step": "0"}, "step"),
        ("/api/v1/query_range", {"query": "up", "start": "1", "end": "2", "step": "soon"}, "soon"),
        ("/api/v1/query_range", {"query": "up", "start": "3", "end": "2", "step": "1"}, "end timestamp"),
        ("/api/v1/query_range", {"query": "up", "end": "2", "step": "1"}, "start"),
        ("/api/v1/query_range", {"query": "up", "start": "0", "end": "100000", "step": "1"}, "11,000 points"),
        ("/api/v1/query_range", {"query": "sum(up", "start": "1", "end": "2", "step": "1"}, "parse error"),
    ],
)
def test_bad_parameters_are_400_bad_data(
    daemon: DaemonProcess, path: str, params: dict[str, str], fragment: str
) -> None:
    message = assert_error(*call(daemon, path, **params), 400, "bad_data")
    assert fragment in message


def test_range_query_may_start_before_the_epoch(daemon: DaemonProcess) -> None:
    data = assert_success(*call(daemon, "/api/v1/query_range", query="1", start="-2", end="0", step="1"))
    assert data["result"][0]["values"] == [[-2, "1"], [-1, "1"], [0, "1"]]


def test_evaluation_errors_are_422_execution(daemon: DaemonProcess) -> None:
    query = "sentinel_gpu_up * on() sentinel_gpu_up"  # many-to-many matching
    assert_error(*call(daemon, "/api/v1/query", query=query), 422, "execution")
    now = str(int(time.time()))
    assert_error(*call(daemon, "/api/v1/query_range", query=query, start=now, end=now, step="1"), 422, "execution")


# -- reload --------------------------------------------------------------------------------------------


def rule_names(daemon: DaemonProcess) -> list[tuple[str, str]]:
    _, body = call(daemon, "/api/v1/rules")
    return [(g["name"], r["name"]) for g in body["data"]["groups"] for r in g["rules"]]


def last_evaluation(daemon: DaemonProcess) -> datetime:
    _, body = call(daemon, "/api/v1/rules")
    return rfc3339(body["data"]["groups"][0]["lastEvaluation"])


def test_sighup_with_a_broken_rule_file_keeps_the_old_rules_running(tmp_path: Path) -> None:
    process = start_daemon(tmp_path)
    try:
        eventually(lambda: len(rule_names(process)) == 4)
        before = rule_names(process)
        rule_file = tmp_path / "gpu.rules.yml"
        rule_file.write_text(RULES.replace("expr: sentinel_gpu_up == 7", "expr: sentinel_gpu_up == (7"))
        process.signal(signal.SIGHUP)
        process.wait_for_log(r"reload failed, keeping the running config and rules")
        process.wait_for_log(
            r'gpu\.rules\.yml: \d+:\d+: group "gpus", rule 4, "NeverFires": could not parse expression'
        )
        assert process.proc.poll() is None
        assert rule_names(process) == before
        evaluated = last_evaluation(process)
        eventually(lambda: last_evaluation(process) > evaluated)  # still evaluating
        assert len(assert_success(*call(process, "/api/v1/alerts"))["alerts"]) == 9

        # A fixed file is then picked up: the rules really do follow the file on SIGHUP.
        rule_file.write_text(RULES.replace("NeverFires", "StillNever"))
        process.signal(signal.SIGHUP)
        process.wait_for_log(r"configuration reloaded")
        eventually(lambda: rule_names(process)[-1] == ("gpus", "StillNever"))
        alerts = lambda: assert_success(*call(process, "/api/v1/alerts"))["alerts"]  # noqa: E731
        eventually(lambda: sum(a["state"] == "firing" for a in alerts()) == 8)
    finally:
        process.stop()


def test_series_labels_and_label_values_for_grafana_variables(daemon: DaemonProcess) -> None:
    # Grafana's label_values() uses these endpoints; they must answer in Prometheus's shape.
    values = assert_success(*call(daemon, "/api/v1/label/gpu/values"))
    assert values == [str(i) for i in range(8)]
    names = assert_success(*call(daemon, "/api/v1/labels", **{"match[]": "sentinel_gpu_info"}))
    assert {"__name__", "gpu", "uuid", "pci_bus_id", "name", "driver_version"} <= set(names)
    series = assert_success(*call(daemon, "/api/v1/series", **{"match[]": 'sentinel_gpu_up{gpu="3"}'}))
    assert [s["gpu"] for s in series] == ["3"] and series[0]["__name__"] == "sentinel_gpu_up"
    assert_error(*call(daemon, "/api/v1/series"), 400, "bad_data")
    assert_error(*call(daemon, "/api/v1/series", **{"match[]": "rate(x[5m])"}), 400, "bad_data")
