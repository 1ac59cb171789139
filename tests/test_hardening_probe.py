"""F6 / build item 1: probe reports are authenticated, bound to their worker, and bounded.

Attacks as someone on the same host (or, with a routable `listen`, the network) would
try them, against a real `sentinel run` where the wiring matters (which transports are
open, which tokens were read) and against the registry for the rest. The positive
controls (a genuine report does fire CudaOOM) keep the negative ones from passing
vacuously.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sentinel.collectors.probe_access import ProbeAccess
from sentinel.collectors.probe_reports import REPORT_PATH, ProbeRegistry
from sentinel.collectors.probe_settings import ProbeConfig
from sentinel.collectors.probe_socket import ProbeSocketError, bind_probe_socket, remove_probe_socket
from sentinel.probe.transport import DeliveryError, parse_target, post_json
from sentinel.remediation.backend import BackendError
from sentinel.store import Store
from sentinel.store.events import EventBus
from tests.daemon_process import DaemonProcess
from tests.support import eventually as wait_for
from tests.test_probe_support import serve_registry

REPO = Path(__file__).resolve().parents[1]
VICTIM_TOKEN = "victim-probe-token-0123456789"
OTHER_TOKEN = "other-probe-token-0123456789"


def report(worker: str, seq: int, num_ooms: int, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": 1,
        "kind": "interval",
        "worker": worker,
        "probe_id": "forged" if worker else "p",
        "seq": seq,
        "interval_s": 1.0,
        "batch_limit": None,
        "layers": [],
        "gpus": {"0": {"num_ooms": num_ooms, "allocated_bytes": 1, "reserved_bytes": 2}},
    }
    body.update(extra)
    return body


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Host:
    daemon: DaemonProcess
    socket: str
    marker: Path


@pytest.fixture
def host(tmp_path: Path, short_dir: Path) -> Iterator[Host]:
    """A daemon that acts on CudaOOM, with two probed workers (tokens) and one unprobed."""
    for name, token in (("victim", VICTIM_TOKEN), ("other", OTHER_TOKEN)):
        (tmp_path / f"{name}.token").write_text(token + "\n")
        (tmp_path / f"{name}.token").chmod(0o600)
    marker = tmp_path / "acted"
    sock = str(short_dir / "probe.sock")
    act = ["sh", "-c", f'echo "$SENTINEL_VERB $SENTINEL_PROFILE" >> {marker}']
    config = {
        "collectors": {"nvml": {"enabled": False}, "host": {"enabled": False}, "logs": {"enabled": False}},
        "workers": [
            {
                "name": "victim",
                "probe": True,
                "probe_token_file": str(tmp_path / "victim.token"),
                "backend": {"type": "command", "apply_profile": act, "restart": act},
                "profiles": [
                    {"name": "full", "env": {"MAX_NUM_SEQS": "16"}, "batch_limit": 16},
                    {"name": "reduced", "env": {"MAX_NUM_SEQS": "4"}, "batch_limit": 4},
                ],
            },
            {"name": "other", "probe": True, "probe_token_file": str(tmp_path / "other.token")},
            {"name": "plain"},
        ],
        "rules": {"files": [str(REPO / "rules" / "oom.yml")], "interval": "1s"},
        "remediation": {"mode": "act", "verify_timeout": "5s"},
        "probe": {"tcp": True, "socket": sock},
    }
    path = tmp_path / "sentinel.yaml"
    path.write_text(json.dumps(config))
    daemon = DaemonProcess("-c", str(path), state_dir=tmp_path / "state")
    try:
        daemon.wait_for_log(r"probe reports on unix socket", timeout=30)
        yield Host(daemon, sock, marker)
    finally:
        daemon.stop()


def refused(target: str, body: dict[str, Any], token: str | None = None) -> str:
    """POST with the probe's own client; returns the refusal (fails if it was accepted)."""
    try:
        reply = post_json(parse_target(target, token=token), body, 5.0)
    except DeliveryError as exc:
        return str(exc)
    raise AssertionError(f"accepted: {reply}")


def metric(daemon: DaemonProcess, name: str) -> list[str]:
    _, _, body = daemon.get("/metrics")
    return [line for line in body.splitlines() if line.startswith(name)]


def alerts(daemon: DaemonProcess) -> list[dict[str, Any]]:
    _, _, body = daemon.get("/api/v1/alerts")
    found: list[dict[str, Any]] = json.loads(body)["data"]["alerts"]
    return found


def actions(daemon: DaemonProcess) -> list[dict[str, Any]]:
    _, _, body = daemon.get("/api/v1/actions")
    found: list[dict[str, Any]] = json.loads(body)["data"]
    return found


def evaluations_after(daemon: DaemonProcess, t: float, rounds: int = 2) -> None:
    """Wait until the OOM rule group has been evaluated `rounds` times after Unix time `t`."""

    def evaluated() -> bool:
        for line in metric(daemon, "sentinel_rule_group_last_evaluation_timestamp_seconds"):
            if "sentinel-oom" in line and float(line.rsplit(" ", 1)[1]) > t + rounds:
                return True
        return False

    wait_for(evaluated, what="rule evaluations")


def test_forged_reports_change_nothing_and_a_genuine_one_still_acts(host: Host) -> None:
    d = host.daemon
    unix = f"unix:{host.socket}"
    tcp = d.base
    forged: list[tuple[str, str | None, str]] = [
        (tcp, None, "Authorization: Bearer"),  # TCP without a token: 401
        (tcp, OTHER_TOKEN, "wrong probe token for worker"),  # B's token for A
        (unix, None, "Authorization: Bearer"),  # the socket, but victim has a token
        (unix, OTHER_TOKEN, "wrong probe token for worker"),
        (unix, "x" * 30, "wrong probe token"),
    ]
    for seq, num_ooms in ((1, 0), (2, 1), (3, 2)):  # 0 -> 1 -> 2 OOMs: CudaOOM if believed
        for target, token, why in forged:
            assert why in refused(target, report("victim", seq, num_ooms), token)
    # A worker without the probe is refused even over the socket, with no token needed.
    assert "does not run the probe" in refused(unix, report("plain", 1, 0))
    assert "does not run the probe" in refused(unix, report("plain", 2, 1))
    # The right token, but a browser's "simple" POST (text/plain) is not a report.
    status, _, body = d.request(
        "POST",
        REPORT_PATH,
        json.dumps(report("victim", 4, 3)).encode(),
        {"Content-Type": "text/plain", "Authorization": f"Bearer {VICTIM_TOKEN}"},
    )
    assert status == 415, body
    forged_at = time.time()
    evaluations_after(d, forged_at)
    assert metric(d, "sentinel_probe_cuda_ooms_total") == []
    assert metric(d, "sentinel_probe_up") == []
    assert [a for a in alerts(d) if a["labels"]["alertname"].startswith("CudaOOM")] == []
    assert actions(d) == []
    assert not host.marker.exists()
    rejected = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in metric(d, "sentinel_probe_reports_rejected_total")
    }
    assert rejected["unauthorized"] == 6 and rejected["forbidden"] == 11 and rejected["content_type"] == 1

    # Positive control: the same two reports with the victim's own token do act.
    for seq, num_ooms in ((1, 0), (2, 1)):
        assert post_json(parse_target(unix, token=VICTIM_TOKEN), report("victim", seq, num_ooms, probe_id="real"), 5.0)
    wait_for(lambda: any(a["labels"]["alertname"] == "CudaOOM" for a in alerts(d)), what="CudaOOM")
    wait_for(lambda: any(a["action"] == "reduce_batch" for a in actions(d)), what="the reduce_batch action")


def test_the_tcp_route_is_off_by_default_and_the_default_socket_works(tmp_path: Path, short_dir: Path) -> None:
    # No `probe:` section: the socket goes where the unit's RuntimeDirectory= puts it,
    # which is what the probe's docs tell a worker to attach to.
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        "collectors: {nvml: {enabled: false}, host: {enabled: false}, logs: {enabled: false}}\n"
        "workers: [{name: w0, probe: true}]\n"
    )
    daemon = DaemonProcess("-c", str(config), state_dir=tmp_path / "state", env={"RUNTIME_DIRECTORY": str(short_dir)})
    try:
        daemon.wait_for_log(r"probe reports on unix socket", timeout=30)
        sock = short_dir / "probe.sock"
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o660
        assert "over TCP are off" in refused(daemon.base, report("w0", 1, 0))
        reply = post_json(parse_target(f"unix:{sock}"), report("w0", 1, 0), 5.0)
        assert reply == {"batch_limit": None}
        wait_for(lambda: any('worker="w0"' in line for line in metric(daemon, "sentinel_probe_up")), what="probe_up")
    finally:
        assert daemon.stop() == 0
    assert not (short_dir / "probe.sock").exists()  # removed at exit


# -- the registry ------------------------------------------------------------------------


async def test_a_forged_batch_limit_acknowledgement_is_not_accepted() -> None:
    access = ProbeAccess.with_tokens({"w0": VICTIM_TOKEN, "w1": OTHER_TOKEN}, tcp=False)
    async with serve_registry(access=access, ack_timeout_s=30) as d:
        good = parse_target(d.url, token=VICTIM_TOKEN)
        await asyncio.to_thread(post_json, good, report("w0", 1, 0), 5.0)
        setter = asyncio.create_task(d.registry.set_batch_limit("w0", 4))
        await asyncio.sleep(0.05)
        for token in (None, OTHER_TOKEN):
            with pytest.raises(DeliveryError):
                await asyncio.to_thread(
                    post_json, parse_target(d.url, token=token), report("w0", 2, 0, batch_limit=4), 5.0
                )
        await asyncio.sleep(0.1)
        assert not setter.done(), "a forged report acknowledged the batch limit"
        assert d.registry.status()[0]["batch_limit"] is None
        await asyncio.to_thread(post_json, good, report("w0", 3, 0, batch_limit=4), 5.0)
        await asyncio.wait_for(setter, 5)


async def test_a_report_for_a_worker_bound_to_another_token_is_refused_over_tcp() -> None:
    access = ProbeAccess.with_tokens({"w0": VICTIM_TOKEN, "w1": OTHER_TOKEN}, tcp=True)
    async with serve_registry(access=access) as d:
        with pytest.raises(DeliveryError, match="403"):
            await asyncio.to_thread(post_json, parse_target(d.tcp_url, token=OTHER_TOKEN), report("w0", 1, 0), 5.0)
        reply = await asyncio.to_thread(post_json, parse_target(d.tcp_url, token=OTHER_TOKEN), report("w1", 1, 0), 5.0)
        assert reply == {"batch_limit": None}
        assert d.value("sentinel_probe_up", worker="w1") == 1 and d.value("sentinel_probe_up", worker="w0") is None
        assert [e.labels["worker"] for e in d.events] == ["w1"]  # no event at all for the refused w0 report


async def test_a_worker_without_a_token_cannot_report_over_tcp() -> None:
    async with serve_registry(access=ProbeAccess.with_tokens({"w0": None}, tcp=True)) as d:
        with pytest.raises(DeliveryError, match="no probe_token_file"):
            await asyncio.to_thread(post_json, parse_target(d.tcp_url), report("w0", 1, 0), 5.0)


async def raw_post(d: Any, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=d.socket)) as session,
        session.post("http://localhost" + REPORT_PATH, data=body, headers={"Content-Type": content_type}) as resp,
    ):
        return resp.status, await resp.text()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"[" * 100_000, "nested too deeply"),  # was a RecursionError: 500
        (json.dumps(report("w0", 1, 10**30)).encode(), "report.gpus['0'].num_ooms"),  # was OverflowError: 500
        (b'{"version": 1, "seq": ' + b"9" * 5000 + b"}", "not valid JSON"),  # > 4,300 digits
        (json.dumps(report("w0", 1, 0, interval_s=1e400)).encode(), "not valid JSON"),  # Infinity is not JSON
        (json.dumps(report("w0", 1, 0, batch_limit=2**64)).encode(), "report.batch_limit"),
    ],
)
async def test_hostile_json_is_a_400_naming_the_problem(body: bytes, expected: str) -> None:
    async with serve_registry() as d:
        status, text = await raw_post(d, body)
        assert status == 400 and expected in text, text
        assert d.store.latest("sentinel_probe_up") == []


async def test_an_oversized_report_is_413_and_a_wide_one_400() -> None:
    async with serve_registry(limits=ProbeConfig(max_report_bytes=4096, max_series_per_report=50)) as d:
        status, text = await raw_post(d, b'{"pad": "' + b"x" * 8192 + b'"}')
        assert status == 413 and "probe.max_report_bytes" in text
        layers = [{"layer": i, "tokens": 1, "balancedness": 0.5} for i in range(60)]
        status, text = await raw_post(d, json.dumps(report("w0", 1, 0, layers=layers)).encode())
        assert status == 400 and "probe.max_series_per_report" in text
        assert d.registry.rejected == {**dict.fromkeys(d.registry.rejected, 0), "too_large": 1, "too_many_series": 1}


async def test_fresh_names_in_every_report_cannot_grow_the_store_without_bound() -> None:
    # C3: 505 MB in 7 s from reports with new GPU and layer names each time.
    limits = ProbeConfig(max_series_per_worker=300)
    async with serve_registry(limits=limits) as d:
        for seq in range(1, 41):
            gpus = {f"g{seq}-{i}": {"tokens_total": 1, "num_ooms": 0} for i in range(20)}
            layers = [{"layer": seq * 100 + i, "tokens": 1, "balancedness": 0.5} for i in range(20)]
            status, text = await raw_post(d, json.dumps(report("w0", seq, 0, gpus=gpus, layers=layers)).encode())
            assert status == 200, text
            oom = report("w0", seq, 0, kind="oom", oom={"gpu": f"x{seq}"}, gpus={})
            assert (await raw_post(d, json.dumps(oom).encode()))[0] == 200
        held = [s for s in d.store.select([]) if ("worker", "w0") in s.labels]
        assert len(held) <= 300
        assert d.store.series_evicted["probe:w0"] > 0
        assert d.value("sentinel_probe_up", worker="w0") == 1  # the live ones are still there


# -- the socket file -----------------------------------------------------------------------


def test_the_socket_never_replaces_a_file_that_is_not_a_socket(short_dir: Path) -> None:
    path = short_dir / "probe.sock"
    path.write_text("not a socket")
    with pytest.raises(ProbeSocketError, match="is not a socket"):
        bind_probe_socket(str(path), 0o660, None)
    assert path.read_text() == "not a socket"


def test_a_live_socket_is_not_taken_over_but_a_stale_one_is(short_dir: Path) -> None:
    path = str(short_dir / "probe.sock")
    first = bind_probe_socket(path, 0o660, None)
    try:
        with pytest.raises(ProbeSocketError, match="another process is listening"):
            bind_probe_socket(path, 0o660, None)
    finally:
        first.sock.close()  # killed without cleanup: the file stays behind
    assert os.path.exists(path)
    second = bind_probe_socket(path, 0o640, None)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        second.sock.close()
        remove_probe_socket(second)
    assert not os.path.exists(path)


def test_socket_group_is_applied_and_an_unknown_group_is_a_clear_error(short_dir: Path) -> None:
    path = str(short_dir / "probe.sock")
    bound = bind_probe_socket(path, 0o660, _group_name(os.getgid()))
    try:
        assert os.stat(path).st_gid == os.getgid()
    finally:
        bound.sock.close()
        remove_probe_socket(bound)
    with pytest.raises(ProbeSocketError, match="does not exist"):
        bind_probe_socket(path, 0o660, "no-such-group-for-sentinel")


def _group_name(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


def test_the_registry_refuses_everything_until_it_is_given_access() -> None:
    registry = ProbeRegistry(Store(), EventBus())
    assert registry.access.refusal("w0", "unix", None) is not None


async def test_set_batch_limit_without_a_probe_still_fails_cleanly() -> None:
    registry = ProbeRegistry(Store(), EventBus())
    with pytest.raises(BackendError, match="no live probe"):
        await registry.set_batch_limit("w0", 4)


def test_a_reload_reads_rotated_probe_tokens(tmp_path: Path, short_dir: Path) -> None:
    token_file = tmp_path / "w0.token"
    token_file.write_text(VICTIM_TOKEN)
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        "collectors: {nvml: {enabled: false}, host: {enabled: false}, logs: {enabled: false}}\n"
        f"workers: [{{name: w0, probe: true, probe_token_file: {token_file}}}]\n"
        f"probe: {{socket: {short_dir / 'probe.sock'}}}\n"
    )
    daemon = DaemonProcess("-c", str(config), state_dir=tmp_path / "state")
    try:
        daemon.wait_for_log(r"probe reports on unix socket", timeout=30)
        unix = f"unix:{short_dir / 'probe.sock'}"
        assert post_json(parse_target(unix, token=VICTIM_TOKEN), report("w0", 1, 0), 5.0) == {"batch_limit": None}
        token_file.write_text(OTHER_TOKEN)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log(r"configuration reloaded")
        assert "wrong probe token" in refused(unix, report("w0", 2, 0), VICTIM_TOKEN)
        assert post_json(parse_target(unix, token=OTHER_TOKEN), report("w0", 3, 0), 5.0) == {"batch_limit": None}
    finally:
        daemon.stop()
