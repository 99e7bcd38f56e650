"""Credentials out of log lines and terminals, and secrets read from mounted files."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from pydantic import ValidationError

from shared import logs
from shared.settings import AppSettings, CommonSettings, WorkerSettings


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:s3cret@redis:6380/0", "rediss://default:***@redis:6380/0"),
        ("https://user:s3cr%40t@mlflow.example.com/", "https://user:***@mlflow.example.com/"),
        ("https://user:pa:ss@w@mlflow/api", "https://user:***@mlflow/api"),
        ("redis://redis/0?password=s3cret&db=1", "redis://redis/0?password=***&db=1"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("tcp://[::1]:5555", "tcp://[::1]:5555"),
        ("sqlite:////tmp/registry.db", "sqlite:////tmp/registry.db"),
    ],
)
def test_redact_url_masks_passwords_only(url, shown):
    assert logs.redact_url(url) == shown


def test_a_known_secret_is_masked_anywhere_even_decoded(monkeypatch):
    monkeypatch.setattr(logs, "_secrets", set())
    logs.add_url_secret("https://user:p%40ssw0rd@mlflow/")
    logs.add_url_secret("/var/lib/mlruns")  # a path names no password
    logs.add_secret("ab")  # too short to replace everywhere
    said = "auth failed for p@ssw0rd / p%40ssw0rd, tab, /var/lib/mlruns"
    assert logs.redact(said) == "auth failed for *** / ***, tab, /var/lib/mlruns"


def test_both_formatters_redact_messages_arguments_and_tracebacks(monkeypatch):
    monkeypatch.setattr(logs, "_secrets", set())
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-s3cret")
    logs.add_env_secrets()
    try:
        raise ConnectionError("API request to https://u:url-s3cret@mlflow/api failed")
    except ConnectionError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "poll failed (%s) with %s", None, None)
        record.exc_info = sys.exc_info()
    record.args = ("redis://:arg-s3cret@r/0", "env-s3cret")
    record.extra_url = "http://a:extra-s3cret@b/"
    for formatter in (logs.JsonFormatter(), logs.RedactingFormatter("%(message)s")):
        line = formatter.format(record)
        assert "s3cret" not in line and ":***@" in line, line
    event = json.loads(logs.JsonFormatter().format(record))
    assert event["msg"] == "poll failed (redis://:***@r/0) with ***"


def test_secret_files_fill_the_url_once_and_refuse_ambiguity(tmp_path, monkeypatch):
    for var in ("TANDEM_REGISTRY_URI", "TANDEM_REDIS_URL", "TANDEM_REGISTRY_URI_FILE", "TANDEM_REDIS_URL_FILE"):
        monkeypatch.delenv(var, raising=False)
    secret = tmp_path / "redis-url"
    secret.write_text("redis://:s3cret@redis:6379/0\n")  # a Secret mounted as a file ends with a newline
    assert AppSettings(redis_url_file=secret).redis_url == "redis://:s3cret@redis:6379/0"
    registry = tmp_path / "registry-uri"
    registry.write_text("https://u:s3cret@mlflow/")
    monkeypatch.setenv("TANDEM_REGISTRY_URI_FILE", str(registry))
    assert WorkerSettings().resolved_registry_uri() == "https://u:s3cret@mlflow/"
    with pytest.raises(ValidationError, match="set registry_uri or registry_uri_file, not both"):
        CommonSettings(registry_uri="http://other/")
    monkeypatch.delenv("TANDEM_REGISTRY_URI_FILE")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        AppSettings(redis_url_file=tmp_path / "empty")
    with pytest.raises(ValidationError, match="No such file"):
        AppSettings(redis_url_file=tmp_path / "absent")
