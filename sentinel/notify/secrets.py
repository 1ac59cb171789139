"""Secrets of the receivers (webhook URLs, HMAC keys): reading them and keeping them out of text.

A Slack incoming-webhook URL *is* the credential, and HTTP client errors like to quote
the URL they failed on (aiohttp's "Connection timeout to host http://..."). Every
secret read here is registered with a `Scrubber`, which replaces it in any text; the
notifier passes exception text through it and installs it as a logging filter on its
own loggers as a second line of defence.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from yarl import URL

__all__ = ["REDACTED", "Scrubber", "SecretError", "read_secret"]

REDACTED = "<redacted>"

# A URL's path or query is scrubbed on its own only when it is long enough to be a
# token: scrubbing "/hook" would mangle unrelated text and protects nothing.
_MIN_PART_LENGTH = 8


class SecretError(Exception):
    """A secret could not be read; the message names where from, never the value."""


def read_secret(what: str, value: str | None = None, file: str | None = None, env: str | None = None) -> str:
    """The secret from exactly one of an inline value, a file or an environment variable.

    Surrounding whitespace is stripped, since files written by `echo` end in a newline.
    Blocking (it may read a file): call it from a thread when a loop is running.
    """
    if value:
        secret = value
    elif file:
        try:
            secret = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise SecretError(f"{what}: cannot read {file}: {exc.strerror or exc}") from None
    elif env:
        if env not in os.environ:
            raise SecretError(f"{what}: environment variable {env} is not set")
        secret = os.environ[env]
    else:
        raise SecretError(f"{what}: no source given")
    secret = secret.strip()
    if not secret:
        raise SecretError(f"{what}: the secret from {file or env or 'the config'} is empty")
    return secret


def _variants(secret: str) -> dict[str, str]:
    """The forms in which a secret may show up in text, each with its replacement.

    A URL keeps its scheme, host and port (which Alertmanager or Slack failed is worth
    knowing; the token is in the path or query), as URL libraries print it or not.
    """
    out = {secret: REDACTED}
    parts = urlsplit(secret)
    if parts.scheme and parts.netloc:
        origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/{REDACTED}"
        out[secret] = origin
        for url in _parsed(secret):
            out[str(url)] = origin
            out[url.human_repr()] = origin
            tail = url.raw_path_qs
            if len(tail) >= _MIN_PART_LENGTH:
                out[tail] = REDACTED
                out[unquote(tail)] = REDACTED
            if url.password:
                out[url.password] = REDACTED
        tail = parts.path + (f"?{parts.query}" if parts.query else "")
        if len(tail) >= _MIN_PART_LENGTH:
            out[tail] = REDACTED
            out[unquote(tail)] = REDACTED
    out.pop("", None)
    return out


def _parsed(secret: str) -> list[URL]:
    try:
        return [URL(secret), URL(secret, encoded=True)]
    except (ValueError, TypeError):  # not a URL yarl accepts: the raw form is all there is
        return []


class Scrubber(logging.Filter):
    """Replaces every registered secret in text; as a logging filter, in records too."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._replacements: dict[str, str] = {}
        self._order: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        """Register a secret (and the forms a URL library would print it in)."""
        for form, replacement in _variants(secret).items():
            self._replacements.setdefault(form, replacement)
        # Longest first, so a full URL is replaced before its path alone.
        self._order = sorted(self._replacements, key=len, reverse=True)

    def add_credentials(self, url: str) -> None:
        """Register only the password of a URL that is not itself secret (`http://user:pw@am:9093`)."""
        parts = urlsplit(url)
        if parts.password:
            self.add(parts.password)
            self.add(unquote(parts.password))

    def scrub(self, text: str) -> str:
        """`text` with every secret replaced by `<redacted>` (a URL keeps its scheme and host)."""
        for secret in self._order:
            if secret in text:
                text = text.replace(secret, self._replacements[secret])
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message and traceback with secrets replaced; never drops it."""
        if not self._order:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the handler's problem, not a leak
            return True
        record.msg = self.scrub(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # Handlers format exc_info themselves, which would bypass the scrub: keep the
            # scrubbed text only. `exc_text` is what text formatters print; JSON ones read
            # `exc` from the record's extra attributes.
            text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
            record.exc_text = text
            record.__dict__["exc"] = text
        elif record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True
