"""Configuration of notification receivers and the outbox."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from sentinel.config.base import Duration, Frozen

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
    name: str = Field(min_length=1)
    url: str | None = Field(None, description="Incoming webhook URL (prefer url_file or url_env: it is a secret).")
    url_file: str | None = None
    url_env: str | None = None
    min_interval: Duration = Field(1.0, ge=0, description="Slack accepts about one message a second per webhook.")
    group_wait: Duration = Field(0.5, ge=0, description="Alerts firing within this window go in one message.")
    send_resolved: bool = Field(True, description="Also post a message when an alert resolves.")
    timeout: Duration = Field(10.0, gt=0, description="Limit on one POST; a slower answer counts as a failed try.")


class WebhookReceiver(_Secret):
    """Alertmanager's version 4 webhook payload, POSTed to any URL."""

    name: str = Field(min_length=1)
    url: str | None = None
    url_file: str | None = None
    url_env: str | None = None
    hmac_secret_file: str | None = Field(None, description="Adds X-Sentinel-Signature: sha256=<hex HMAC>.")
    hmac_secret_env: str | None = Field(None, description="Like hmac_secret_file, from an environment variable.")
    send_resolved: bool = Field(True, description="Also POST when an alert resolves.")
    send_actions: bool = Field(True, description="POST remediation reports too, as alerts named SentinelAction.")
    timeout: Duration = Field(10.0, gt=0, description="Limit on one POST; a slower answer counts as a failed try.")

    @model_validator(mode="after")
    def _one_hmac_source(self) -> WebhookReceiver:
        if self.hmac_secret_file and self.hmac_secret_env:
            raise ValueError("give at most one of hmac_secret_file, hmac_secret_env")
        return self


class AlertmanagerReceiver(Frozen):
    name: str = Field("alertmanager", min_length=1)
    urls: tuple[str, ...] = Field(min_length=1, description="Base URLs; alerts go to each /api/v2/alerts.")
    resend_delay: Duration = Field(60.0, gt=0, description="Re-send firing alerts this often, as Prometheus.")
    timeout: Duration = Field(10.0, gt=0, description="Limit on one push to one Alertmanager.")

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                # Only the scheme is named: the URL may carry credentials.
                raise ValueError(f"Alertmanager URLs must be http(s)://host[:port][/prefix], not {parts.scheme!r}")
        return urls


class OutboxConfig(Frozen):
    max_length: int = Field(10_000, gt=0, description="Queue bound per receiver; drops are counted and logged.")
    min_backoff: Duration = Field(1.0, gt=0, description="Backoff ceiling after the first failed try; then doubling.")
    max_backoff: Duration = Field(300.0, gt=0)
    max_age: Duration = Field(86400.0, gt=0, description="Give up on a notification older than this.")

    @model_validator(mode="after")
    def _ordered(self) -> OutboxConfig:
        if self.min_backoff > self.max_backoff:
            raise ValueError("min_backoff cannot exceed max_backoff")
        return self


class NotifyConfig(Frozen):
    slack: tuple[SlackReceiver, ...] = ()
    webhook: tuple[WebhookReceiver, ...] = ()
    alertmanager: tuple[AlertmanagerReceiver, ...] = ()
    outbox: OutboxConfig = OutboxConfig()
    proxy_from_env: bool = Field(
        True, description="Honour HTTPS_PROXY/NO_PROXY from the environment (Slack is usually outside the LAN)."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> NotifyConfig:
        # The name keys the outbox rows and the metrics' `receiver` label, so it must be unique.
        names = [r.name for r in self.slack] + [r.name for r in self.webhook] + [r.name for r in self.alertmanager]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"receiver names must be unique across slack, webhook and alertmanager: {duplicates}")
        return self
