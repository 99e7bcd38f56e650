"""API keys on the HTTP API: who may call it, and how often.

With ``--api-keys-file`` set, every request except the probes (``/healthz``, ``/readyz``,
``/v2/health/live``, ``/v2/health/ready``) and ``/metrics`` (unless ``--api-keys-protect-metrics``) must
carry a known key, as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``: none or an unknown one is
answered 401 ``unauthorized``, a key over its rate 429 ``rate_limited`` with ``Retry-After``.

The file holds one JSON object per line (blank lines and ``#`` comments are skipped)::

    {"name": "team-a", "hash": "sha256:9f86d0...", "rps": 50}
    {"name": "batch-jobs", "hash": "sha256:2c26b4...", "rps": 5, "burst": 20}
    {"name": "ops", "hash": "sha256:fcde2b..."}

``name`` labels metrics and messages (letters, digits, ``.``, ``_``, ``-``; unique), ``hash`` is the
sha256 of the key (the file holds no key), ``rps`` the key's requests per second (absent: unlimited) and
``burst`` how many it may send at once after a quiet spell (default: one second's worth, at least 1).
``tandem keys api-key`` (or :func:`new_key`) makes a key and appends its line.

Why a fast hash: a key is 32 random bytes (``secrets.token_urlsafe(32)``), so nobody can guess one
whatever the hash costs. Slow password hashes (bcrypt, argon2) exist to make guessing low-entropy
passwords expensive; here they would only add tens of milliseconds of CPU to every request and give a
caller with junk keys a cheap way to burn the server's CPU. sha256 still keeps a leaked file from
handing out working keys.

Where the check runs: :class:`ApiKeyMiddleware` in front of the routed application, and
:class:`~app_server.fast_path.PredictFastPath` for the prediction routes it takes past that
application; both call :meth:`ApiKeys.check`, one dict lookup of the presented key's digest.

Rate limits are a token bucket per key *per app server replica*: each replica counts only what it
serves, so N replicas behind a load balancer let a key through at up to N times its ``rps``. Exact
fleet-wide limits need a shared counter (Redis, a gateway) on every request's path, a round trip and a
dependency that can fail; a per-replica bucket costs nothing and still stops a runaway client from
starving the others. Set ``rps`` to the per-replica share when that matters (for instance the HPA's
minimum replicas).

The file is re-read when it changes (checked once a second, off the event loop); an edit that breaks it
keeps the last good set in force and logs an error (never an open server). A bad, empty or unreadable
file at start-up stops the app server. An empty file is refused too: an editor that truncates before
it writes would otherwise lock everyone out for a moment, and a server with no keys is not useful.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app_server import metrics
from app_server.error_render import error_response
from shared.errors import RateLimited, TandemError, Unauthorized
from shared.settings import AppSettings

logger = logging.getLogger(__name__)

KEY_PREFIX = "tdm_"
"""Every generated key starts with it, so a key pasted somewhere it should not be is recognisable."""
RELOAD_INTERVAL_S = 1.0
PROBES = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
METRICS_PATH = "/metrics"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH = re.compile(r"sha256:([0-9a-f]{64})")
_FIELDS = {"name", "hash", "rps", "burst"}


class ApiKeyFileError(ValueError):
    """The key file cannot be used: unreadable, empty or malformed (the message names the line)."""


@dataclass(frozen=True)
class KeyEntry:
    name: str
    digest: bytes
    """sha256 of the key."""
    rps: float | None = None
    burst: float = 1.0


def digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def hash_key(key: str) -> str:
    """What the key file stores for ``key``: ``sha256:<hex>``."""
    return "sha256:" + digest(key).hex()


def _number(value: Any, field: str, where: str, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
        raise ApiKeyFileError(f"{where}: {field} must be a number of at least {low:g}, not {value!r}")
    return float(value)


def parse_entry(obj: Any, where: str) -> KeyEntry:
    if not isinstance(obj, dict):
        raise ApiKeyFileError(f'{where}: expected an object like {{"name": ..., "hash": "sha256:..."}}')
    if unknown := sorted(set(obj) - _FIELDS):
        raise ApiKeyFileError(f"{where}: unknown field {unknown[0]!r} (fields: name, hash, rps, burst)")
    name, hashed = obj.get("name"), obj.get("hash")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ApiKeyFileError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-', not {name!r}")
    match = _HASH.fullmatch(hashed) if isinstance(hashed, str) else None
    if match is None:
        raise ApiKeyFileError(f"{where}: hash must be 'sha256:' and 64 lowercase hex digits (never the key itself)")
    rps = None if obj.get("rps") is None else _number(obj["rps"], "rps", where, 0.001)
    if obj.get("burst") is not None and rps is None:
        raise ApiKeyFileError(f"{where}: burst needs rps")
    burst = _number(obj["burst"], "burst", where, 1) if obj.get("burst") is not None else max(1.0, rps or 1.0)
    return KeyEntry(name, bytes.fromhex(match.group(1)), rps, burst)


def parse_keys(text: str, source: str, *, allow_empty: bool = False) -> dict[bytes, KeyEntry]:
    """The keys of a key file's ``text``, by digest; :class:`ApiKeyFileError` on the first bad line."""
    entries: dict[bytes, KeyEntry] = {}
    names: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ApiKeyFileError(f"{where}: not a JSON object ({exc})") from None
        entry = parse_entry(obj, where)
        if entry.name in names:
            raise ApiKeyFileError(f"{where}: name {entry.name!r} is used twice")
        if entry.digest in entries:
            raise ApiKeyFileError(f"{where}: the same key as {entries[entry.digest].name!r}")
        names.add(entry.name)
        entries[entry.digest] = entry
    if not entries and not allow_empty:
        raise ApiKeyFileError(f"{source}: no keys in the file (add one with `tandem keys api-key`)")
    return entries


def read_keys(path: Path) -> dict[bytes, KeyEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ApiKeyFileError(f"{path}: cannot read the API key file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ApiKeyFileError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return parse_keys(text, str(path))


def new_key(path: Path, name: str, rps: float | None = None, burst: float | None = None) -> str:
    """Make a key, append its hash line to ``path`` (created owner-only, 0600) and return the key: the
    only time it exists outside the caller's hands. Refuses a name already in the file, or a file that
    does not parse (appending to it would hide the damage)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    obj: dict[str, Any] = {"name": name, "hash": hash_key(key)}
    for field, value in (("rps", rps), ("burst", burst)):
        if value is not None:
            obj[field] = int(value) if float(value).is_integer() else value  # 10, not 10.0
    entry = parse_entry(obj, "new key")
    path = Path(path)
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if any(e.name == entry.name for e in parse_keys(existing, str(path), allow_empty=True).values()):
        raise ApiKeyFileError(f"{path}: there is already a key named {name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(("\n" if existing and not existing.endswith("\n") else "") + json.dumps(obj) + "\n")
    return key


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; a request takes one."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.updated = rate, burst, burst, now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one will be there."""
        tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        if tokens >= 1:
            self.tokens = tokens - 1
            return 0.0
        self.tokens = tokens
        return (1 - tokens) / self.rate


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries: ``Authorization: Bearer KEY``, else ``X-API-Key: KEY``."""
    api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            api_key = value.strip()
    return api_key


def _path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeys:
    """The set of keys in force, their rate buckets, and the watch that re-reads the file."""

    def __init__(
        self,
        path: Path,
        entries: dict[bytes, KeyEntry],
        *,
        protect_metrics: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.exempt = frozenset(PROBES if protect_metrics else (*PROBES, METRICS_PATH))
        self.clock = clock
        self._entries: dict[bytes, KeyEntry] = {}
        self._buckets: dict[bytes, TokenBucket] = {}
        self._seen: tuple[int, ...] | None = None
        self._failed: tuple[tuple[int, ...] | None, str] | None = None
        self._install(entries)

    @classmethod
    def load(cls, path: Path, **kw: Any) -> ApiKeys:
        """The keys of ``path``; :class:`ApiKeyFileError` if it cannot be used (the server must not start)."""
        path = Path(path)
        seen = _signature(path)
        keys = cls(path, read_keys(path), **kw)
        keys._seen = seen
        return keys

    @classmethod
    def from_settings(cls, settings: AppSettings) -> ApiKeys | None:
        if settings.api_keys_file is None:
            return None
        return cls.load(settings.api_keys_file, protect_metrics=settings.api_keys_protect_metrics)

    def names(self) -> list[str]:
        return sorted(e.name for e in self._entries.values())

    def _install(self, entries: dict[bytes, KeyEntry]) -> None:
        """Swap in a new set (on the event loop): a key whose limit is unchanged keeps its bucket, so an
        edit elsewhere in the file does not hand every key a fresh burst."""
        buckets = {}
        for d, entry in entries.items():
            if entry.rps is None:
                continue
            same = self._entries.get(d) == entry and d in self._buckets
            buckets[d] = self._buckets[d] if same else TokenBucket(entry.rps, entry.burst, self.clock())
        self._entries, self._buckets = entries, buckets

    def check(self, scope: Scope) -> TandemError | None:
        """None if the request may go on, else the error to answer it with (and it is counted).

        Why this does not leak timing: the presented key is never compared with a stored key. It is
        hashed, and the digest is looked up in a dict of the stored digests. Whatever the lookup's timing
        could reveal is how much of *sha256(guess)* matched a stored digest, and a guess whose digest
        matches more cannot be built from that without inverting sha256; with a plain ``==`` on the keys
        an attacker could instead grow a match one character at a time.
        """
        if _path(scope) in self.exempt:
            return None
        key = presented_key(scope["headers"])
        if key is None:
            metrics.child(metrics.API_KEY_REQUESTS, "", "missing").inc()
            return Unauthorized("no API key: send Authorization: Bearer KEY or X-API-Key: KEY")
        entry = self._entries.get(hashlib.sha256(key).digest())
        if entry is None:
            metrics.child(metrics.API_KEY_REQUESTS, "", "unknown").inc()
            return Unauthorized("unknown API key")
        bucket = self._buckets.get(entry.digest)
        if bucket is not None and (wait := bucket.take(self.clock())):
            metrics.child(metrics.API_KEY_REQUESTS, entry.name, "rate_limited").inc()
            return RateLimited(f"API key {entry.name}: over its {entry.rps:g} requests per second", wait)
        metrics.child(metrics.API_KEY_REQUESTS, entry.name, "admitted").inc()
        scope.setdefault("state", {})["api_key"] = entry.name
        return None

    def read_if_changed(self) -> dict[bytes, KeyEntry] | None:
        """The file's keys if it changed since it was last read and parses; None otherwise. Blocking file
        I/O: :meth:`watch` runs it in a thread. A bad edit is logged and counted once, and changes nothing."""
        seen = None
        try:
            seen = _signature(self.path)
            if seen == self._seen:
                return None
            entries = read_keys(self.path)
        except ApiKeyFileError as exc:
            if self._failed != (seen, str(exc)):
                self._failed = (seen, str(exc))
                metrics.API_KEY_RELOADS.labels("error").inc()
                kept = len(self._entries)
                logger.error("API key file not re-read; the previous %d keys stay in force: %s", kept, exc)
            return None
        self._seen, self._failed = seen, None
        metrics.API_KEY_RELOADS.labels("ok").inc()
        logger.info("API keys re-read from %s: %d keys", self.path, len(entries))
        return entries

    def reload(self) -> bool:
        """Re-read the file now if it changed (blocking; tests and :meth:`watch`'s body)."""
        entries = self.read_if_changed()
        if entries is not None:
            self._install(entries)
        return entries is not None

    async def watch(self, interval: float = RELOAD_INTERVAL_S) -> None:
        """Re-read the file when it changes; the stat and read run in a thread, the swap on the loop."""
        while True:
            await asyncio.sleep(interval)
            try:
                entries = await asyncio.to_thread(self.read_if_changed)
            except Exception:  # a bug here must not stop the watch (the last set stays in force)
                logger.exception("API key file watch failed")
                continue
            if entries is not None:
                self._install(entries)


def _signature(path: Path) -> tuple[int, ...]:
    """What changes when the file does: a rewrite (mtime, size), a replacement or a Kubernetes Secret
    update (inode, through the symlink), a chmod (ctime)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ApiKeyFileError(f"{path}: cannot read the API key file ({exc.strerror or exc})") from None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def refusal(scope: Scope, exc: TandemError) -> Response:
    """The 401 or 429 answer, in the route's error shape; counted by metrics, not logged."""
    response = error_response(Request(scope), exc, log=False)
    if isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="tandem"'
    return response


class ApiKeyMiddleware:
    """The check in front of the routed application (pure ASGI, like the metrics middleware)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and (refused := self.keys.check(scope)) is not None:
            if scope["type"] == "http":
                await refusal(scope, refused)(scope, receive, send)
            else:  # no websocket route today; one added later must not be open by accident
                await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)
