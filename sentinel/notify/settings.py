"""Configuration of notification receivers and the outbox."""

from __future__ import annotations

from pydantic import Field, model_validator

from sentinel.configbase import Duration, Frozen

__all__ = [
    "AlertmanagerReceiver",
    "NotifyConfig",
    "OutboxConfig",
    "SlackReceiver",
    "WebhookReceiver",
]


class _Secret(Frozen):
    """A URL or token read from a file or an environment variable, never from the config itself."""

    @model_validator(mode="after")
    def _one_source(self) -> _Secret:
        sources = [n for n in ("url", "url_file", "url_env") if getattr(self, n, None)]
        if len(sources) != 1:
            raise ValueError("give exactly one of url, url_file, url_env")
        return self


class SlackReceiver(_Secret):
    name: str
    url: str | None = Field(None, description="Incoming webhook URL (prefer url_file or url_env: it is a secret).")
    url_file: str | None = None
    url_env: str | None = None
    min_interval: Duration = Field(1.0, ge=0, description="Slack accepts about one message a second per webhook.")
    group_wait: Duration = Field(0.5, ge=0, description="Alerts firing within this window go in one message.")


class WebhookReceiver(_Secret):
    """Alertmanager's version 4 webhook payload, POSTed to any URL."""

    name: str
    url: str | None = None
    url_file: str | None = None
    url_env: str | None = None
    hmac_secret_file: str | None = Field(None, description="Adds X-Sentinel-Signature: sha256=<hex HMAC>.")


class AlertmanagerReceiver(Frozen):
    name: str = "alertmanager"
    urls: tuple[str, ...] = Field(min_length=1, description="Base URLs; alerts go to each /api/v2/alerts.")
    resend_delay: Duration = Field(60.0, gt=0, description="Re-send firing alerts this often, as Prometheus.")


class OutboxConfig(Frozen):
    max_length: int = Field(10_000, gt=0, description="Queue bound per receiver; drops are counted and logged.")
    max_backoff: Duration = Field(300.0, gt=0)
    max_age: Duration = Field(86400.0, gt=0, description="Give up on a notification older than this.")


class NotifyConfig(Frozen):
    slack: tuple[SlackReceiver, ...] = ()
    webhook: tuple[WebhookReceiver, ...] = ()
    alertmanager: tuple[AlertmanagerReceiver, ...] = ()
    outbox: OutboxConfig = OutboxConfig()
