"""Notification settings: the mistakes the config refuses, with messages that name them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sentinel.notify.actions import ActionReport, describe
from sentinel.notify.alertmanager import target_names
from sentinel.notify.notices import generator_url
from sentinel.notify.settings import AlertmanagerReceiver, NotifyConfig
from sentinel.notify.transport import parse_retry_after


def test_receiver_names_must_be_unique_across_kinds() -> None:
    with pytest.raises(ValidationError, match=r"unique.*\['ops'\]"):
        NotifyConfig.model_validate(
            {"slack": [{"name": "ops", "url_env": "A"}], "webhook": [{"name": "ops", "url_env": "B"}]}
        )


def test_a_secret_needs_exactly_one_source() -> None:
    with pytest.raises(ValidationError, match="exactly one of url, url_file, url_env"):
        NotifyConfig.model_validate({"slack": [{"name": "ops", "url_env": "A", "url_file": "/f"}]})
    with pytest.raises(ValidationError, match="at most one of hmac_secret_file, hmac_secret_env"):
        NotifyConfig.model_validate(
            {"webhook": [{"name": "h", "url_env": "A", "hmac_secret_file": "/f", "hmac_secret_env": "B"}]}
        )


def test_alertmanager_urls_are_http_and_errors_do_not_echo_credentials() -> None:
    with pytest.raises(ValidationError) as info:
        AlertmanagerReceiver(urls=("am.local:9093/path-with-pa55word",))
    assert "pa55word" not in str(info.value).split("input_value")[0]
    many = AlertmanagerReceiver(urls=("http://u:pw@am-0:9093", "http://am-1:9093"))
    assert target_names(many) == ["alertmanager@am-0:9093", "alertmanager@am-1:9093"]
    assert target_names(AlertmanagerReceiver(name="am", urls=("http://am:9093",))) == ["am"]


def test_durations_read_like_the_rest_of_the_config() -> None:
    config = NotifyConfig.model_validate({"outbox": {"min_backoff": "500ms", "max_backoff": "5m", "max_age": "1d"}})
    assert (config.outbox.min_backoff, config.outbox.max_backoff, config.outbox.max_age) == (0.5, 300.0, 86400.0)
    with pytest.raises(ValidationError, match="min_backoff cannot exceed max_backoff"):
        NotifyConfig.model_validate({"outbox": {"min_backoff": "10m", "max_backoff": "5m"}})


def test_generator_url_matches_prometheus_table_link() -> None:
    expr = 'sum by (gpu) (rate(sentinel_gpu_xid_errors_total{xid="79"}[5m])) > 0'
    assert generator_url("http://node-1:9101/", expr) == (
        "http://node-1:9101/graph?g0.expr=sum+by+%28gpu%29+%28rate%28sentinel_gpu_xid_errors_total"
        "%7Bxid%3D%2279%22%7D%5B5m%5D%29%29+%3E+0&g0.tab=1"
    )
    assert generator_url("http://node-1:9101", "up").startswith("http://node-1:9101/graph?")


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("outcome", "extra", "sentence"),
    [
        ("started", {}, "reducing batch on qwen3 from full to reduced after CudaOOM"),
        (
            "failed",
            {"detail": "env file not writable"},
            "failed to reduce batch on qwen3 from full to reduced after CudaOOM: env file not writable",
        ),
        ("would_act", {}, "would reduce batch on qwen3 from full to reduced after CudaOOM (observe mode)"),
        (
            "succeeded",
            {"seconds_to_healthy": 4.25},
            "reduced batch on qwen3 from full to reduced after CudaOOM; healthy again in 4.2 s",
        ),
    ],
)
def test_action_reports_read_as_sentences(outcome: str, extra: dict[str, object], sentence: str) -> None:
    report = ActionReport(
        worker="qwen3",
        action="reduce_batch",
        outcome=outcome,  # type: ignore[arg-type]
        timestamp_ms=0,
        from_profile="full",
        to_profile="reduced",
        alertname="CudaOOM",
        **extra,  # type: ignore[arg-type]
    )
    assert describe(report) == sentence
