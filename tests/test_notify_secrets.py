"""Webhook URLs and tokens come from files or the environment and never show in logs or errors."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sentinel.notify.actions import ActionReport
from sentinel.notify.dispatcher import Notifier, NotifyConfigError
from sentinel.notify.secrets import REDACTED, Scrubber, SecretError, read_secret
from sentinel.notify.settings import NotifyConfig
from sentinel.notify.testing import RecordingReceiver, Reply, running_notifier
from sentinel.store import Store
from tests.support import eventually_async as eventually

SECRET_PATH = "/services/T0SECRET/B0SECRET/xoxb%7Esecret-token-4242"
# yarl prints %7E as "~": the scrubber must know that form too.
SECRET_FORMS = ("T0SECRET", "B0SECRET", "secret-token-4242")


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept backlog is full: connecting times out, and aiohttp quotes the URL then."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for s in [*fillers, server]:
        s.close()


def assert_clean(text: str) -> None:
    for form in SECRET_FORMS:
        assert form not in text, f"secret leaked: {text!r}"


async def wait_failures(notifier: Notifier, receiver: str, n: int) -> None:
    await eventually(lambda: notifier.deliverer(receiver).failures >= n, what=f"{n} failed tries")


async def test_url_from_file_never_appears_in_logs_or_errors_on_connect_timeout(
    tmp_path: Path, blackhole: int, caplog: pytest.LogCaptureFixture
) -> None:
    url_file = tmp_path / "slack-url"
    url_file.write_text(f"http://127.0.0.1:{blackhole}{SECRET_PATH}\n")
    config = {
        "slack": [{"name": "ops", "url_file": str(url_file), "group_wait": 0, "min_interval": 0, "timeout": 0.3}],
        "outbox": {"min_backoff": 0.05, "max_backoff": 0.1},
    }
    caplog.set_level(logging.DEBUG)
    async with running_notifier(config, tmp_path / "state") as notifier:
        await notifier.report_action(ActionReport(worker="qwen3", action="restart", outcome="started", timestamp_ms=1))
        await wait_failures(notifier, "ops", 2)
        error = notifier.deliverer("ops").last_error
        rows = await notifier.outbox.rows("ops")
        # Scrubbed, but still useful: it says what went wrong and where.
        assert error == f"ConnectionTimeoutError: Connection timeout to host http://127.0.0.1:{blackhole}/{REDACTED}"
        # And a log line that quotes the URL directly is scrubbed by the filter.
        logging.getLogger("sentinel.notify.slack").warning("posting to %s", url_file.read_text().strip())
        try:
            raise RuntimeError(f"boom at {url_file.read_text().strip()}")
        except RuntimeError:
            logging.getLogger("sentinel.notify.delivery").exception("unexpected")

    assert_clean(error)
    assert all(row.last_error is not None for row in rows)
    for row in rows:
        assert_clean(row.last_error or "")
    assert_clean(caplog.text)
    assert f"posting to http://127.0.0.1:{blackhole}/{REDACTED}" in caplog.text
    assert f"RuntimeError: boom at http://127.0.0.1:{blackhole}/{REDACTED}" in caplog.text


async def test_url_from_env_is_scrubbed_from_error_bodies_that_echo_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Some proxies answer "no route for <path>": the error text would carry the token.
    async with RecordingReceiver(default=Reply(502, f"no upstream for {SECRET_PATH.replace('%7E', '~')}")) as hook:
        monkeypatch.setenv("HOOK_URL", hook.url + SECRET_PATH)
        config = {
            "webhook": [{"name": "hook", "url_env": "HOOK_URL"}],
            "outbox": {"min_backoff": 0.05, "max_backoff": 0.1},
        }
        caplog.set_level(logging.DEBUG)
        async with running_notifier(config, tmp_path / "state") as notifier:
            await notifier.report_action(ActionReport(worker="w", action="restart", outcome="started", timestamp_ms=1))
            await wait_failures(notifier, "hook", 2)
            error = notifier.deliverer("hook").last_error
    assert error.startswith("HTTP 502: no upstream for <redacted>")
    assert_clean(caplog.text)
    assert hook.requests[0].path.startswith("/services/T0SECRET")  # the real URL was used


async def test_missing_secrets_are_reported_together_without_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_HOOK_URL", raising=False)
    config = NotifyConfig.model_validate(
        {
            "slack": [{"name": "ops", "url_file": str(tmp_path / "missing")}],
            "webhook": [{"name": "hook", "url_env": "NO_SUCH_HOOK_URL"}],
        }
    )
    notifier = Notifier(config, Store(), tmp_path / "state", "http://s/", {}, 1.0)
    with pytest.raises(NotifyConfigError) as info:
        await notifier.start()
    message = str(info.value)
    assert "slack 'ops' url: cannot read" in message and "missing" in message
    assert "webhook 'hook' url: environment variable NO_SUCH_HOOK_URL is not set" in message
    await notifier.close()


def test_read_secret_strips_the_trailing_newline_and_refuses_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "url").write_text("https://hooks.slack.test/services/A/B/C\n")
    assert read_secret("x", file=str(tmp_path / "url")) == "https://hooks.slack.test/services/A/B/C"
    monkeypatch.setenv("EMPTY_SECRET", "  \n")
    with pytest.raises(SecretError, match="empty"):
        read_secret("x", env="EMPTY_SECRET")


def test_scrubber_catches_the_forms_url_libraries_print() -> None:
    scrubber = Scrubber(["https://hooks.slack.test/services/T1/B2/to%7Eken"])
    for text in (
        "POST https://hooks.slack.test/services/T1/B2/to%7Eken failed",
        "Connection timeout to host https://hooks.slack.test/services/T1/B2/to~ken",
        "404 for /services/T1/B2/to~ken",
    ):
        assert "T1/B2" not in scrubber.scrub(text), text
    assert scrubber.scrub("nothing secret here") == "nothing secret here"
    creds = Scrubber()
    creds.add_credentials("http://admin:pa55word@am:9093")
    assert creds.scrub("auth pa55word rejected") == f"auth {REDACTED} rejected"
