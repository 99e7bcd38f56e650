"""Logging setup: one JSON object per line for machines, plain text on a terminal, and no secrets in either.

Credentials reach Tandem inside URLs (``redis://:PASSWORD@host``, ``https://user:PASSWORD@mlflow``) and in
environment variables MLflow reads (``MLFLOW_TRACKING_PASSWORD``). Every line written through here is
redacted (:func:`redact`), not only the lines Tandem words itself: a library's exception message may
carry the URL it failed on. What is redacted: the password of any ``scheme://user:password@`` URL, query
parameters named like a secret (``password``, ``token``, ``key``, ``signature``...), and the values of
the secret environment variables and of passwords this process was configured with (:func:`add_secret`).
Uncaught exceptions are printed redacted too, from the first moment (settings are parsed before logging
is configured, and a settings error quotes its input).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from types import TracebackType
from urllib.parse import unquote, urlsplit

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}

MASK = "***"
SECRET_ENV = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "REDISCLI_AUTH",
)
"""Environment variables whose values are secrets wherever they appear."""
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/?#@\s]*):(?P<password>[^/?#\s]+)@")
_SECRET_PARAM = re.compile(
    r"(?i)(?P<key>[?&;][\w.-]*(?:pass|pwd|secret|token|key|signature|credential|auth)[\w.-]*=)[^&;#\s'\"]+"
)
_MIN_SECRET = 4
"""Shorter values are not replaced wherever they appear: they would mangle ordinary text."""
_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    """Redact ``value`` wherever it appears from now on (as it is, and percent-decoded)."""
    for v in (value, unquote(value or "")):
        if v and len(v) >= _MIN_SECRET:
            _secrets.add(v)


def add_url_secret(url: str | None) -> None:
    """Redact the password of ``url`` wherever it appears from now on, also outside a URL."""
    if url and "://" in url:
        add_secret(urlsplit(url).password)


def add_env_secrets() -> None:
    """Redact the values of the secret environment variables (:data:`SECRET_ENV`)."""
    for name in SECRET_ENV:
        add_secret(os.environ.get(name))


def redact(text: str) -> str:
    """``text`` with every credential this module knows of replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _SECRET_PARAM.sub(lambda m: f"{m['key']}{MASK}", text)
    for secret in _secrets:
        text = text.replace(secret, MASK)
    return text


def redact_url(url: str | None) -> str:
    """A URL fit for a log line or a terminal: its password (and secret-looking parameters) masked."""
    return "" if url is None else redact(url)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        event.update(
            {k: redact(v) if isinstance(v, str) else v for k, v in record.__dict__.items() if k not in _RESERVED}
        )
        if record.exc_info:
            event["exc"] = redact(self.formatException(record.exc_info))
        return redact(json.dumps(event, default=str))  # what default=str turned into text, too


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _print_uncaught(kind: type[BaseException], exc: BaseException | None, tb: TracebackType | None) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))


def _print_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if not issubclass(args.exc_type, SystemExit):  # as the default hook: a thread's exit is not an error
        _print_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def redact_uncaught() -> None:
    """Print uncaught exceptions (main thread and others) redacted: a settings error quotes the settings."""
    add_env_secrets()
    sys.excepthook = _print_uncaught
    threading.excepthook = _print_uncaught_in_thread


def configure(
    level: str = "INFO", fmt: str = "auto", process: str = "tandem", secret_urls: Iterable[str | None] = ()
) -> None:
    """Log to stderr; the passwords of ``secret_urls`` are redacted wherever they appear, besides what
    :func:`redact` finds."""
    for url in secret_urls:
        add_url_secret(url)
    redact_uncaught()
    # MLflow installs its own handler on its loggers when imported (after this), bypassing redaction.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(
        JsonFormatter()
        if use_json
        else RedactingFormatter(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("mlflow", "alembic", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
