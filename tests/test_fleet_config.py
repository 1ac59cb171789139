"""The `fleet:` section: valid configs load, each mistake gets a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sentinel.fleet.cli import CliError, load_fleet_section
from sentinel.fleet.config import FleetConfig, MaxUnavailable, check_against_workers

BASE = {"endpoints": ["http://127.0.0.1:2379"], "host_id": "host-a"}
GROUP = {
    "name": "qwen3-480b",
    "members": [{"member": "host-a:qwen3-r0", "head": True}, {"member": "host-b:qwen3-r1"}],
}


def fleet(**over: object) -> FleetConfig:
    return FleetConfig.model_validate({**BASE, **over})


def error_of(**over: object) -> str:
    with pytest.raises(ValidationError) as info:
        fleet(**over)
    return str(info.value)


def test_defaults_are_the_documented_ones() -> None:
    cfg = fleet()
    assert (cfg.lease_ttl, cfg.partition_policy, cfg.name, cfg.prefix) == (
        10.0,
        "hold",
        "default",
        "/sentinel/default/",
    )
    assert cfg.budget.max_unavailable == MaxUnavailable(count=1)
    assert FleetConfig(endpoints=("http://e:2379",)).host_id  # the hostname by default


@pytest.mark.parametrize(
    ("value", "live", "limit"),
    [(2, 100, 2), ("2", 7, 2), ("25%", 8, 2), ("25%", 9, 3), ("10%", 1, 1), ("100%", 4, 4), ("50%", 0, 0)],
)
def test_max_unavailable_counts_and_percentages_round_up_like_a_pdb(value: object, live: int, limit: int) -> None:
    assert fleet(budget={"max_unavailable": value}).budget.max_unavailable.limit(live) == limit


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("150%", "at most 100%"),
        ("0%", "above 0%"),
        ("lots", "expected a count such as 2"),
        (-1, "cannot be negative"),
        (True, "not a boolean"),
    ],
)
def test_bad_max_unavailable_is_named(value: object, message: str) -> None:
    assert message in error_of(budget={"max_unavailable": value})


def test_a_group_with_two_heads_is_refused() -> None:
    two = {"name": "g", "members": [{"member": "a:w0", "head": True}, {"member": "b:w1", "head": True}]}
    assert "exactly one member with head: true (found a:w0, b:w1)" in error_of(groups=[two])


def test_a_group_without_a_head_is_refused() -> None:
    none = {"name": "g", "members": [{"member": "a:w0"}, {"member": "b:w1"}]}
    assert "exactly one member with head: true (found none)" in error_of(groups=[none])


def test_a_member_named_twice_is_refused() -> None:
    dup = {"name": "g", "members": [{"member": "a:w0", "head": True}, {"member": "a:w0"}]}
    assert "names member 'a:w0' twice" in error_of(groups=[dup])


def test_a_member_in_two_groups_is_refused() -> None:
    other = {"name": "g2", "members": [{"member": "host-a:qwen3-r0", "head": True}, {"member": "c:w"}]}
    assert "is in groups 'qwen3-480b' and 'g2'" in error_of(groups=[GROUP, other])


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"groups": [{"name": "g", "members": [{"member": "host-a", "head": True}, {"member": "b:w"}]}]},
            "host:worker",
        ),
        ({"groups": [GROUP, GROUP]}, "defined twice"),
        ({"endpoints": ["127.0.0.1:2379"]}, "must be a URL"),
        ({"endpoints": ["http://a:2379", "https://b:2379"]}, "mix of http:// and https://"),
        ({"tls": {"ca_file": "/ca.pem"}}, "no endpoint is https://"),
        ({"endpoints": ["https://a:2379"], "tls": {"cert_file": "/c.pem"}}, "cert_file and tls.key_file go together"),
        ({"user": "sentinel"}, "user and password_file go together"),
        ({"lease_ttl": "1s"}, "greater than or equal to 2"),
        ({"name": "a/b"}, "fleet name 'a/b'"),
        ({"partition_policy": "yolo"}, "'hold' or 'local'"),
        ({"breaker": {"share": 1.5}}, "less than or equal to 1"),
        ({"budget": {"per_label": [{"label": "model", "max_unavailable": 1}] * 2}}, "names label 'model' twice"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_config_mistakes_are_named(over: dict[str, object], message: str) -> None:
    assert message in error_of(**over)


def test_group_helpers_give_start_order_and_membership() -> None:
    three = {
        "name": "g",
        "members": [{"member": "a:w0"}, {"member": "b:w1", "head": True}, {"member": "c:w2"}],
    }
    cfg = fleet(groups=[three])
    assert [m.member for m in cfg.groups[0].start_order()] == ["b:w1", "a:w0", "c:w2"]
    assert cfg.group_of("c", "w2") is cfg.groups[0]
    assert cfg.group_of("c", "w9") is None


def test_check_against_workers_names_an_unknown_local_member() -> None:
    cfg = fleet(groups=[GROUP])
    assert check_against_workers(cfg, "host-a", ["qwen3-r0"]) == []
    assert check_against_workers(cfg, "host-c", []) == []  # not this host's members
    [problem] = check_against_workers(cfg, "host-a", ["other"])
    assert problem.startswith("fleet.groups.0.members.0.member: 'host-a:qwen3-r0' is on this host (host-a)")
    assert "no worker is named 'qwen3-r0' (workers: other)" in problem


def test_cli_loader_reports_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.yaml"
    path.write_text("fleet:\n  endpoints: [http://127.0.0.1:2379]\n  budget:\n    max_unavailable: 150%\n")
    with pytest.raises(CliError) as info:
        load_fleet_section(path)
    assert str(info.value).startswith(f"{path}:4:")
    assert "fleet.budget.max_unavailable" in str(info.value)
    path.write_text("workers: []\n")
    with pytest.raises(CliError, match="no fleet: section"):
        load_fleet_section(path)
