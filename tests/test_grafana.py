"""The Grafana dashboards: every PromQL expression parses and reads only real metrics.

"Real" is a catalogue built from the things themselves: the `sentinel_*` names a running
daemon serves on /metrics (simulated 8-GPU host, default rules loaded), the `sentinel_*`
names declared in the package source (collectors that the simulation does not start,
the probe, remediation, notifications), the vLLM and SGLang families that
shared/reference documents and samples, the recording rules of rules/, and the series
the rule engine synthesises. A dashboard that names anything else fails here.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sentinel.promql import metric_names, reads_any_metric
from tests.conftest import IN_CI
from tests.daemon_process import DaemonProcess

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "grafana" / "dashboards"
PROVISIONING = REPO / "grafana" / "provisioning"
RULES = REPO / "rules"
REFERENCE_CANDIDATES = [
    Path(os.environ.get("SENTINEL_REFERENCE_DIR", "/nonexistent")),
    REPO / "shared" / "reference",
    REPO.parent / "shared" / "reference",
]
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SYNTHETIC = frozenset({"ALERTS", "ALERTS_FOR_STATE"})  # written by the rule engine, Sentinel's and Prometheus's
ENGINE_NAME = re.compile(r"\b((?:vllm|sglang):[A-Za-z_][A-Za-z0-9_]*)")
SENTINEL_NAME = re.compile(r"""["'](sentinel_[a-z0-9_]+)["']""")
# Grafana's own variables, replaced by a duration before parsing.
GRAFANA_DURATIONS = re.compile(r"\$__(?:rate_interval|interval|range)\b|\$\{__(?:rate_interval|interval|range)\}")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


# -- the catalogue ----------------------------------------------------------------------


def reference_dir() -> Path:
    """shared/reference (FORMATS.md, samples/); fails under CI when absent, skips otherwise."""
    for path in REFERENCE_CANDIDATES:
        if (path / "FORMATS.md").is_file():
            return path
    message = "shared/reference/FORMATS.md not found: set SENTINEL_REFERENCE_DIR to the shared reference directory"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def engine_families(reference: Path) -> frozenset[str]:
    """vLLM and SGLang metric names from FORMATS.md and the sample /metrics body."""
    text = (reference / "FORMATS.md").read_text()
    sample = reference / "samples" / "vllm-metrics.txt"
    if sample.is_file():
        text += "\n" + sample.read_text()
    return frozenset(ENGINE_NAME.findall(text))


def declared_sentinel_names() -> frozenset[str]:
    """Every quoted `sentinel_*` name in the package: what collectors and subsystems declare."""
    names: set[str] = set()
    for path in (REPO / "sentinel").rglob("*.py"):
        names.update(SENTINEL_NAME.findall(path.read_text()))
    return frozenset(names)


def recorded_names() -> frozenset[str]:
    names: set[str] = set()
    for path in RULES.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names.update(rule["record"] for rule in group["rules"] if "record" in rule)
    return frozenset(names)


def parse_samples(body: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


@functools.lru_cache(maxsize=1)
def healthy_host_scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics of the real daemon on the simulated healthy-8gpu host, with rules/*.yml loaded.

    Taken once every rule group has been evaluated a few times (shared by the rule tests).
    """
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "sentinel.yaml"
        config.write_text(
            f"collectors:\n  nvml:\n    kernel_log: 'off'\nrules:\n  files: [{json.dumps(str(RULES / '*.yml'))}]\n"
        )
        daemon = DaemonProcess("-c", str(config), "--simulate", "healthy-8gpu", state_dir=Path(tmp) / "state")
        try:
            groups = sum(len(yaml.safe_load(p.read_text())["groups"]) for p in RULES.glob("*.yml"))
            deadline = time.monotonic() + 30
            last: dict[str, list[tuple[dict[str, str], float]]] = {}
            while time.monotonic() < deadline:
                last = parse_samples(daemon.get("/metrics")[2])
                evaluated = last.get("sentinel_rule_group_last_evaluation_timestamp_seconds", [])
                if len(last.get("sentinel_gpu_up", [])) == 8 and len(evaluated) == groups:
                    time.sleep(3)  # let the 1 s groups run a few more times
                    return parse_samples(daemon.get("/metrics")[2])
                time.sleep(0.2)
            raise AssertionError(f"the daemon did not evaluate {groups} rule groups; last scrape: {sorted(last)}")
        finally:
            daemon.stop()


@dataclass(frozen=True)
class Catalogue:
    exported: frozenset[str]
    declared: frozenset[str]
    engine: frozenset[str]
    recorded: frozenset[str]

    def knows(self, name: str) -> bool:
        if name in self.exported | self.declared | self.recorded | SYNTHETIC:
            return True
        if name.startswith(("vllm:", "sglang:")):
            base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
            return name in self.engine or base in self.engine
        return False


@functools.lru_cache(maxsize=1)
def _catalogue(reference: Path) -> Catalogue:
    return Catalogue(
        exported=frozenset(healthy_host_scrape()),
        declared=declared_sentinel_names(),
        engine=engine_families(reference),
        recorded=recorded_names(),
    )


def catalogue() -> Catalogue:
    """What Sentinel exports or scrapes (see the module docstring)."""
    return _catalogue(reference_dir())


def unknown_names(expr: str) -> list[str]:
    known = catalogue()
    return sorted(n for n in metric_names(expr) if not known.knows(n))


# -- the dashboards -------------------------------------------------------------------------


def dashboards() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def variable_query(var: dict[str, Any]) -> str | None:
    query = var.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    return query if isinstance(query, str) and query else None


def promql_of_variable(query: str) -> str | None:
    """The PromQL inside a Prometheus variable query, or None for one that holds none."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.S)
    if m:
        return m.group(1)
    m = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    if m:
        return m.group(1)
    if re.fullmatch(r"\s*(label_values\(\s*\w+\s*\)|label_names\(\)|metrics\(.*\))\s*", query, re.S):
        return None
    return query


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out: list[tuple[str, str]] = []
    for panel in all_panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = variable_query(var)
            promql = promql_of_variable(query) if query else None
            if promql:
                out.append((f"variable {var['name']}", promql))
    return out


def substitute(expr: str) -> str:
    """Grafana variables replaced so that the result is plain PromQL."""
    expr = GRAFANA_DURATIONS.sub("5m", expr)
    return VARIABLE.sub("x", expr)


def all_expressions() -> list[tuple[str, str]]:
    return [(f"{path.name}: {where}", expr) for path in dashboards() for where, expr in expressions(load(path))]


def test_there_are_the_four_dashboards() -> None:
    uids = {load(p)["uid"] for p in dashboards()}
    assert uids == {"sentinel-gpu-host", "sentinel-serving", "sentinel-moe", "sentinel-alerts"}


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_dashboard_takes_its_prometheus_data_source_from_a_variable(path: Path) -> None:
    board = load(path)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    assert board["schemaVersion"] >= 36
    users = [p for p in all_panels(board["panels"]) if p.get("type") != "row"]
    users += [v for v in board["templating"]["list"] if v["type"] == "query"]
    for item in users:
        assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, item.get("title", item.get("name"))
    for panel in all_panels(board["panels"]):
        for target in panel.get("targets", []):
            assert target.get("datasource", panel["datasource"]) == {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_dashboard_has_unique_panel_ids_and_uses_only_its_own_variables(path: Path) -> None:
    board = load(path)
    ids = [p["id"] for p in all_panels(board["panels"])]
    assert len(ids) == len(set(ids))
    defined = {v["name"] for v in board["templating"]["list"]}
    for where, expr in expressions(board):
        used = {next(g for g in m.groups() if g) for m in VARIABLE.finditer(GRAFANA_DURATIONS.sub("", expr))}
        assert used <= defined, f"{where}: {sorted(used - defined)} not defined"


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_dashboard_filters_by_host_and_offers_worker_or_gpu(path: Path) -> None:
    board = load(path)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert "instance" in variables
    assert {"worker", "gpu"} & set(variables)
    for name in ("instance", "worker", "gpu"):
        if name in variables:
            assert variable_query(variables[name]).startswith("label_values(")  # type: ignore[union-attr]


@pytest.mark.parametrize(("where", "expr"), all_expressions(), ids=[w for w, _ in all_expressions()])
def test_every_expression_parses_and_reads_only_metrics_sentinel_exports_or_scrapes(where: str, expr: str) -> None:
    promql = substitute(expr)
    promql_parser.parse(promql)
    assert not reads_any_metric(promql), f"{where}: a selector without a metric name cannot be checked"
    assert metric_names(promql), f"{where}: reads no metric"
    assert unknown_names(promql) == [], f"{where}: {expr}"


def test_the_catalogue_check_rejects_a_name_nobody_exports() -> None:
    assert unknown_names('sum(rate(sentinel_gpu_xid_errors_total{gpu="0"}[5m]))') == []
    assert unknown_names("histogram_quantile(0.99, rate(vllm:time_to_first_token_seconds_bucket[5m]))") == []
    assert unknown_names("sentinel_gpu_temperature_fahrenheit + vllm:num_requests_queued") == [
        "sentinel_gpu_temperature_fahrenheit",
        "vllm:num_requests_queued",
    ]


def test_the_catalogue_comes_from_the_running_daemon_and_the_references() -> None:
    known = catalogue()
    assert {"sentinel_gpu_up", "sentinel_gpus_visible", "sentinel_rule_group_rules"} <= known.exported
    assert {"sentinel_endpoint_up", "sentinel_log_events_total", "sentinel_nccl_ras_up"} <= known.declared
    assert {"vllm:num_requests_waiting", "sglang:num_queue_reqs", "vllm:time_to_first_token_seconds"} <= known.engine


def test_grafana_variables_become_plain_promql() -> None:
    expr = 'rate(x{worker=~"$worker", gpu=~"${gpu}", i=~"[[instance]]"}[$__rate_interval]) / ${__range}'
    assert substitute(expr) == 'rate(x{worker=~"x", gpu=~"x", i=~"x"}[5m]) / 5m'
    assert promql_of_variable('label_values(sentinel_gpu_up{instance=~"$instance"}, gpu)') == (
        'sentinel_gpu_up{instance=~"$instance"}'
    )
    assert promql_of_variable("label_values(worker)") is None


def test_provisioning_points_grafana_at_the_dashboards_and_a_prometheus() -> None:
    dashboards_cfg = yaml.safe_load((PROVISIONING / "dashboards" / "sentinel.yml").read_text())
    assert dashboards_cfg["apiVersion"] == 1
    [provider] = dashboards_cfg["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    sources = yaml.safe_load((PROVISIONING / "datasources" / "sentinel.yml").read_text())
    assert sources["apiVersion"] == 1
    assert sources["datasources"] and all(d["type"] == "prometheus" for d in sources["datasources"])
    assert sum(bool(d.get("isDefault")) for d in sources["datasources"]) == 1
