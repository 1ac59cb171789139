"""The default rules in rules/: valid for promtool and Sentinel, unit-tested under both,
documented, and acting only through actions the remediation engine knows.

The unit tests in rules/tests/ must give the same verdict under Prometheus 2.42's
`promtool test rules` (range windows and lookback closed on the left) and `sentinel
test rules` (3.x, open on the left); `test_test_inputs_never_sit_on_a_window_edge`
keeps them on the safe side of that difference where promtool is not installed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from sentinel.promql import metric_names
from sentinel.remediation.settings import ACTIONS
from sentinel.rules.rulefile import parse_prom_duration
from tests.conftest import require_tool
from tests.daemon_process import DaemonProcess
from tests.test_grafana import healthy_host_scrape, unknown_names

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "rules"
RULE_TESTS = RULES / "tests"
RUNBOOKS = REPO / "docs" / "runbooks.md"
SEVERITIES = ("critical", "warning", "info")
LOOKBACK_S = 300
RANGE = re.compile(r"\[(\w+)(?::\w*)?\]")


def rule_files() -> list[Path]:
    return sorted(RULES.glob("*.yml"))


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS.glob("*.test.yml"))


def alerts() -> list[tuple[str, dict[str, Any]]]:
    """(file name, rule) for every alerting rule."""
    out = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            out += [(path.name, rule) for rule in group["rules"] if "alert" in rule]
    return out


def alert_ids() -> list[str]:
    return [rule["alert"] for _, rule in alerts()]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


# -- the two tools ---------------------------------------------------------------------------


@pytest.mark.integration
def test_promtool_check_rules_is_clean() -> None:
    promtool = require_tool("promtool", "prometheus")
    done = run([promtool, "check", "rules", *map(str, rule_files())])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_promtool_test_rules_passes() -> None:
    promtool = require_tool("promtool", "prometheus")
    done = run([promtool, "test", "rules", *map(str, rule_test_files())])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("compat", ["2", "3"])
def test_sentinel_check_rules_is_clean(compat: str) -> None:
    argv = [sys.executable, "-m", "sentinel", "check", "rules", "--prometheus-compat", compat]
    done = run([*argv, *map(str, rule_files())])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("compat", ["2", "3"])
def test_sentinel_test_rules_passes(compat: str) -> None:
    argv = [sys.executable, "-m", "sentinel", "test", "rules", "--prometheus-compat", compat]
    done = run([*argv, *map(str, rule_test_files())])
    assert done.returncode == 0, done.stdout + done.stderr


# -- what every alert carries ----------------------------------------------------------------


@pytest.mark.parametrize(("file", "rule"), alerts(), ids=alert_ids())
def test_alert_has_severity_and_its_annotations(file: str, rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in SEVERITIES
    for key in ("summary", "description", "runbook"):
        assert rule.get("annotations", {}).get(key, "").strip(), f"{file}: {rule['alert']} has no {key}"


@pytest.mark.parametrize(("file", "rule"), alerts(), ids=alert_ids())
def test_alert_runbook_is_a_section_of_the_runbooks(file: str, rule: dict[str, Any]) -> None:
    runbook = rule["annotations"]["runbook"]
    assert runbook == f"docs/runbooks.md#{rule['alert'].lower()}"
    assert runbook.split("#", 1)[1] in runbook_anchors(), f"no section {rule['alert']} in {RUNBOOKS}"


def runbook_anchors() -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in RUNBOOKS.read_text().splitlines():
        if m := re.match(r"#+\s+(.*)", line):
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_every_runbook_link_inside_the_runbooks_resolves() -> None:
    links = set(re.findall(r"\]\(#([\w-]+)\)", RUNBOOKS.read_text()))
    assert links <= runbook_anchors()


@pytest.mark.parametrize(("file", "rule"), alerts(), ids=alert_ids())
def test_alert_action_is_a_remediation_action(file: str, rule: dict[str, Any]) -> None:
    action = rule["labels"].get("action")
    assert action is None or action in ACTIONS, f"{file}: {rule['alert']}: {action!r} is not one of {ACTIONS}"


def test_alert_names_are_unique() -> None:
    names = alert_ids()
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("file", "rule"), alerts(), ids=alert_ids())
def test_alert_reads_only_metrics_sentinel_exports_or_scrapes(file: str, rule: dict[str, Any]) -> None:
    assert metric_names(rule["expr"])
    assert unknown_names(rule["expr"]) == [], f"{file}: {rule['alert']}"


# -- the unit tests of the rules -------------------------------------------------------------


def test_every_rule_file_has_a_test_file_and_no_test_file_is_orphaned() -> None:
    assert {p.name.removesuffix(".test.yml") for p in rule_test_files()} == {p.stem for p in rule_files()}
    for path in rule_test_files():
        spec = yaml.safe_load(path.read_text())
        assert spec["rule_files"] == [f"../{path.name.removesuffix('.test.yml')}.yml"]


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in rule_test_files():
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = set(alert_ids())
    assert names - firing == set(), "never seen firing"
    assert names - quiet == set(), "never seen quiet"


def test_test_inputs_never_sit_on_a_window_edge() -> None:
    """No evaluation's range window nor lookback starts exactly on an input sample.

    Evaluations run at multiples of `evaluation_interval`, samples lie at multiples of each
    test group's `interval`: 2.42 and 3.x differ only for a sample at t - window.
    """
    windows = {LOOKBACK_S * 1000}
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                windows |= {parse_prom_duration(w) for w in RANGE.findall(rule["expr"])}
    for path in rule_test_files():
        spec = yaml.safe_load(path.read_text())
        step = parse_prom_duration(spec["evaluation_interval"])
        for group in spec["tests"]:
            interval = parse_prom_duration(group["interval"])
            for window in windows:
                edges = [k * step - window for k in range(4000) if k * step >= window]
                on_sample = [t for t in edges if t % interval == 0]
                assert not on_sample, f"{path.name}: {group['name']}: a {window} ms window starts on a sample"


# -- the rules in the real daemon ---------------------------------------------------------------


def test_default_rules_run_clean_on_a_healthy_host() -> None:
    """Loaded by the daemon on the simulated healthy host: every group evaluates, none fails, none fires."""
    scrape = healthy_host_scrape()
    groups = {labels["rule_group"].rsplit(";", 1)[1]: v for labels, v in scrape["sentinel_rule_group_rules"]}
    expected = {g["name"]: len(g["rules"]) for p in rule_files() for g in yaml.safe_load(p.read_text())["groups"]}
    assert groups == expected
    assert all(v == 0 for _, v in scrape["sentinel_rule_evaluation_failures_total"])
    firing = [labels for labels, v in scrape["sentinel_alerts"] if labels["state"] == "firing" and v]
    assert firing == []


@pytest.mark.wallclock
def test_an_xid_fires_its_alert_within_a_second_in_the_real_daemon(tmp_path: Path) -> None:
    """xid-storm: GPU 5 raises Xid 13 ten seconds in; GPUXidApplication fires at once (event-driven)."""
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        f"collectors:\n  nvml:\n    kernel_log: 'off'\nrules:\n  files: [{json.dumps(str(RULES / '*.yml'))}]\n"
    )
    daemon = DaemonProcess("-c", str(config), "--simulate", "xid-storm", state_dir=tmp_path / "state")
    try:
        logged = daemon.wait_for_log(r"^(\S+Z) .*Xid 13 on GPU 5", timeout=30)
        deadline = time.monotonic() + 5
        firing: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not firing:
            alerts = json.loads(daemon.get("/api/v1/alerts")[2])["data"]["alerts"]
            firing = [
                a for a in alerts if a["labels"]["alertname"] == "GPUXidApplication" and a["labels"]["xid"] == "13"
            ]
            time.sleep(0.1)
    finally:
        daemon.stop()
    [alert] = firing
    assert alert["state"] == "firing"
    assert {k: alert["labels"][k] for k in ("gpu", "class", "action", "severity")} == {
        "gpu": "5",
        "class": "application",
        "action": "restart",
        "severity": "warning",
    }
    active_at = datetime.fromisoformat(alert["activeAt"].replace("Z", "+00:00"))
    xid_at = datetime.fromisoformat(logged.group(1).replace("Z", "+00:00"))
    assert (active_at - xid_at).total_seconds() < 1.0
