"""API keys: the key file (good, bad, empty, unreadable), the token bucket on an injected clock, the check
itself, and a re-read that keeps the last good set when an edit breaks the file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from app_server import api_keys, metrics
from app_server.api_keys import ApiKeyFileError, ApiKeys, TokenBucket, hash_key, new_key, parse_keys, read_keys
from shared.errors import RateLimited, Unauthorized


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def line(name: str, key: str, **kw: Any) -> str:
    return json.dumps({"name": name, "hash": hash_key(key), **kw})


def scope(path: str = "/predict", **headers: str) -> dict[str, Any]:
    return {
        "type": "http",
        "path": path,
        "headers": [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()],
    }


def requests(key: str, outcome: str) -> float:
    return metrics.API_KEY_REQUESTS.labels(key, outcome)._value.get()


# -- the file ----------------------------------------------------------------------------------------


def test_a_good_file_parses_with_comments_blank_lines_and_defaults():
    text = "\n".join(
        ["# team keys", "", line("a", "key-a"), line("b", "key-b", rps=5), line("c", "key-c", rps=0.5, burst=10)]
    )
    entries = {e.name: e for e in parse_keys(text, "f").values()}
    assert set(entries) == {"a", "b", "c"}
    assert entries["a"].rps is None
    assert (entries["b"].rps, entries["b"].burst) == (5, 5)  # one second's worth by default
    assert (entries["c"].rps, entries["c"].burst) == (0.5, 10)
    assert entries["a"].digest == hashlib.sha256(b"key-a").digest()


H = hash_key("k")
BAD_FILES = [
    ("", "f: no keys"),
    ("# only a comment\n\n", "f: no keys"),
    ("{not json", "f:1: not a JSON object"),
    ('["a", "b"]', "f:1: expected an object"),
    (f'{{"name": "a", "hash": "{H}", "limit": 3}}', "unknown field 'limit'"),
    (f'{{"hash": "{H}"}}', "name must be"),
    (f'{{"name": "a b", "hash": "{H}"}}', "name must be"),
    ('{"name": "a", "hash": "k"}', "hash must be 'sha256:'"),  # the key itself, not its hash
    (f'{{"name": "a", "hash": "{H.upper()}"}}', "hash must be"),
    (f'{{"name": "a", "hash": "{H[:-1]}"}}', "hash must be"),
    (f'{{"name": "a", "hash": "{H}", "rps": 0}}', "rps must be a number"),
    (f'{{"name": "a", "hash": "{H}", "rps": -1}}', "rps must be a number"),
    (f'{{"name": "a", "hash": "{H}", "rps": true}}', "rps must be a number"),
    (f'{{"name": "a", "hash": "{H}", "rps": "5"}}', "rps must be a number"),
    (f'{{"name": "a", "hash": "{H}", "burst": 5}}', "burst needs rps"),
    (f'{{"name": "a", "hash": "{H}", "rps": 1, "burst": 0.5}}', "burst must be"),
    (line("a", "k1") + "\n" + line("a", "k2"), "f:2: name 'a' is used twice"),
    (line("a", "k1") + "\n" + line("b", "k1"), "f:2: the same key as 'a'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_file_is_refused_with_the_line_and_the_reason(text, message):
    with pytest.raises(ApiKeyFileError, match=re.escape(message)):
        parse_keys(text, "f")


@pytest.mark.parametrize(("text", "message"), BAD_FILES[:3])
def test_a_bad_file_stops_start_up(tmp_path, text, message):
    path = tmp_path / "keys.jsonl"
    path.write_text(text)
    with pytest.raises(ApiKeyFileError, match=re.escape(f"{path}{message.removeprefix('f')}")):
        ApiKeys.load(path)


def test_a_missing_a_non_text_or_a_directory_key_file_stops_start_up(tmp_path):
    with pytest.raises(ApiKeyFileError, match="cannot read"):
        ApiKeys.load(tmp_path / "absent.jsonl")
    with pytest.raises(ApiKeyFileError, match="cannot read"):
        ApiKeys.load(tmp_path)
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ApiKeyFileError, match="not UTF-8"):
        ApiKeys.load(tmp_path / "bin")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_file_stops_start_up(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text(line("a", "k") + "\n")
    path.chmod(0)
    with pytest.raises(ApiKeyFileError, match="cannot read"):
        read_keys(path)


def test_new_key_appends_a_hash_line_to_an_owner_only_file(tmp_path):
    path = tmp_path / "sub" / "keys.jsonl"
    key = new_key(path, "team-a", rps=5)
    assert key.startswith("tdm_") and len(key) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key not in path.read_text()
    other = new_key(path, "team-b")
    entries = {e.name: e for e in read_keys(path).values()}
    assert entries["team-a"].digest == hashlib.sha256(key.encode()).digest() and entries["team-a"].rps == 5
    assert entries["team-b"].digest == hashlib.sha256(other.encode()).digest() and entries["team-b"].rps is None
    with pytest.raises(ApiKeyFileError, match="already a key named 'team-a'"):
        new_key(path, "team-a")
    with pytest.raises(ApiKeyFileError, match="name must be"):
        new_key(path, "no spaces")
    assert len(read_keys(path)) == 2


def test_new_key_adds_a_line_break_and_refuses_a_broken_file(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text("# hand written\n" + line("a", "k"))  # no final newline
    new_key(path, "b")
    assert [e.name for e in read_keys(path).values()] == ["a", "b"]
    path.write_text("{broken\n")
    with pytest.raises(ApiKeyFileError, match="not a JSON object"):
        new_key(path, "c")
    assert path.read_text() == "{broken\n"


# -- the bucket and the check ------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate_and_says_how_long_to_wait():
    b = TokenBucket(rate=2.0, burst=2.0, now=0.0)
    assert b.take(0.0) == 0 and b.take(0.0) == 0
    assert b.take(0.0) == pytest.approx(0.5)
    assert b.take(0.25) == pytest.approx(0.25)  # half a token back, half still to come
    assert b.take(0.5) == 0
    assert b.take(100.0) == 0 and b.take(100.0) == 0 and b.take(100.0) > 0  # never more than the burst


@pytest.fixture
def keys(tmp_path) -> ApiKeys:
    path = tmp_path / "keys.jsonl"
    path.write_text(line("open", "key-open") + "\n" + line("slow", "key-slow", rps=2) + "\n")
    return ApiKeys.load(path, clock=Clock())


def test_the_check_takes_either_header_and_refuses_none_or_an_unknown_key(keys):
    before = requests("", "missing"), requests("", "unknown"), requests("open", "admitted")
    assert keys.check(scope(authorization="Bearer key-open")) is None
    assert keys.check(scope(authorization="bearer   key-open ")) is None
    assert keys.check(scope(x_api_key="key-open")) is None
    assert isinstance(keys.check(scope()), Unauthorized)
    assert isinstance(keys.check(scope(authorization="Basic a2V5LW9wZW4=")), Unauthorized)
    assert isinstance(keys.check(scope(authorization="Bearer key-ope")), Unauthorized)
    assert isinstance(keys.check(scope(x_api_key="key-open-and-more")), Unauthorized)
    assert isinstance(keys.check(scope(x_api_key=hash_key("key-open"))), Unauthorized)  # the file's line is no key
    after = requests("", "missing"), requests("", "unknown"), requests("open", "admitted")
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 3, 3]


def test_probes_and_metrics_need_no_key_unless_metrics_are_protected(keys, tmp_path):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
        assert keys.check(scope(path)) is None, path
    for path in ("/v1/models", "/v2", "/openapi.json", "/docs", "/healthz/x", "/nope"):
        assert isinstance(keys.check(scope(path)), Unauthorized), path
    assert keys.check({**scope("/api/healthz"), "root_path": "/api"}) is None
    strict = ApiKeys.load(keys.path, protect_metrics=True)
    assert isinstance(strict.check(scope("/metrics")), Unauthorized)
    assert strict.check(scope("/healthz")) is None


def test_a_key_over_its_rate_is_refused_with_retry_after_and_the_others_are_not(keys):
    clock: Clock = keys.clock  # type: ignore[assignment]
    slow = scope(x_api_key="key-slow")
    assert keys.check(slow) is None and keys.check(slow) is None
    refused = keys.check(slow)
    assert isinstance(refused, RateLimited) and refused.retry_after_s == pytest.approx(0.5)
    assert "slow" in refused.message and "key-slow" not in refused.message
    assert all(keys.check(scope(x_api_key="key-open")) is None for _ in range(100))
    clock.t += 0.5
    assert keys.check(slow) is None


def test_the_check_looks_up_a_digest_of_the_key_never_the_key(keys, monkeypatch):
    """Constant time by design: the presented key is only ever hashed, and what is looked up is its
    digest; the set holds digests only, so there is no stored key to compare a guess with."""
    hashed: list[bytes] = []
    looked_up: list[Any] = []

    class Spy:
        @staticmethod
        def sha256(data: bytes) -> Any:
            hashed.append(bytes(data))
            return hashlib.sha256(data)

    class Table(dict):
        def get(self, k: Any, default: Any = None) -> Any:
            looked_up.append(k)
            return super().get(k, default)

        def __getitem__(self, k: Any) -> Any:
            raise AssertionError("the check must go through .get with a digest")

    monkeypatch.setattr(api_keys, "hashlib", Spy)
    keys._entries = Table(keys._entries)
    assert keys.check(scope(authorization="Bearer key-open")) is None
    assert isinstance(keys.check(scope(x_api_key="key-opem")), Unauthorized)
    assert hashed == [b"key-open", b"key-opem"]
    assert looked_up == [hashlib.sha256(b"key-open").digest(), hashlib.sha256(b"key-opem").digest()]
    assert all(isinstance(k, bytes) and len(k) == 32 for k in keys._entries)
    assert "key-open" not in repr(vars(keys)) and "key-open" not in repr(list(keys._entries.values()))


async def test_a_websocket_without_a_key_is_closed_before_the_application(keys):
    from app_server.api_keys import ApiKeyMiddleware

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def application(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("reached the application")

    await ApiKeyMiddleware(application, keys)({"type": "websocket", "path": "/ws", "headers": []}, None, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


# -- re-reading --------------------------------------------------------------------------------------


def test_a_reload_admits_new_keys_and_a_bad_edit_keeps_the_last_good_set(keys, caplog):
    clock: Clock = keys.clock  # type: ignore[assignment]
    path = keys.path
    errors = metrics.API_KEY_RELOADS.labels("error")._value.get()
    assert keys.reload() is False  # unchanged: not re-read
    slow = scope(x_api_key="key-slow")
    assert keys.check(slow) is None and keys.check(slow) is None
    new_key_line = line("late", "key-late")
    path.write_text(path.read_text() + new_key_line + "\n")
    assert keys.reload() is True
    assert keys.check(scope(x_api_key="key-late")) is None
    assert isinstance(keys.check(slow), RateLimited)  # an unchanged key keeps its bucket: no fresh burst

    for broken in ("", "{half a line", line("late", "x") + "\n" + line("late", "y")):
        path.write_text(broken)
        with caplog.at_level(logging.ERROR, logger="app_server.api_keys"):
            caplog.clear()
            assert keys.reload() is False
            assert keys.reload() is False  # logged and counted once per bad edit
        assert len([r for r in caplog.records if "stay in force" in r.message]) == 1
        assert keys.check(scope(x_api_key="key-late")) is None
        assert isinstance(keys.check(scope(x_api_key="x")), Unauthorized)
    assert metrics.API_KEY_RELOADS.labels("error")._value.get() == errors + 3

    path.unlink()
    assert keys.reload() is False
    assert keys.check(scope(x_api_key="key-open")) is None
    path.write_text(line("only", "key-only", rps=1) + "\n")
    assert keys.reload() is True
    assert isinstance(keys.check(scope(x_api_key="key-open")), Unauthorized)  # removed: refused
    clock.t += 10
    assert keys.check(scope(x_api_key="key-only")) is None


async def test_the_watch_reloads_off_the_event_loop(keys, monkeypatch):
    import asyncio
    import threading

    threads: list[int] = []

    def recording_read(path: Path) -> Any:
        threads.append(threading.get_ident())
        return read_keys(path)

    monkeypatch.setattr(api_keys, "read_keys", recording_read)
    task = asyncio.create_task(keys.watch(interval=0.01))
    try:
        keys.path.write_text(keys.path.read_text() + line("late", "key-late") + "\n")
        for _ in range(200):
            if keys.check(scope(x_api_key="key-late")) is None:
                break
            await asyncio.sleep(0.01)
        assert keys.check(scope(x_api_key="key-late")) is None
        assert threads and threading.get_ident() not in threads  # the file was read in a thread
    finally:
        task.cancel()


def test_the_cli_prints_the_key_once_and_stores_its_hash(tmp_path):
    from typer.testing import CliRunner

    from tandem.cli import app

    path: Path = tmp_path / "keys.jsonl"
    result = CliRunner().invoke(app, ["keys", "api-key", "--name", "ci", "--rps", "3", "--file", str(path)])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("tdm_") and "\n" not in key
    (entry,) = read_keys(path).values()
    assert (entry.name, entry.rps, entry.digest) == ("ci", 3, hashlib.sha256(key.encode()).digest())
    again = CliRunner().invoke(app, ["keys", "api-key", "--name", "ci", "--file", str(path)])
    assert again.exit_code == 2 and "already a key named 'ci'" in again.stderr


@pytest.mark.parametrize("content", ["", "{oops\n", None])
def test_the_app_refuses_to_be_built_on_a_bad_key_file(tmp_path, content):
    from app_server.app import create_app
    from shared.settings import AppSettings

    path = tmp_path / "keys.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ApiKeyFileError, match=str(path)):
        create_app(AppSettings(api_keys_file=path, worker_urls="tcp://127.0.0.1:9"))
