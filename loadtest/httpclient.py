"""A deliberately tiny HTTP/1.1 keep-alive client for load generation.

Why not httpx or aiohttp: on a 2-core machine every microsecond the generator spends is taken from the
servers it measures. This client sends one pre-serialised request (bytes built once) and parses only
what the load test needs: the status code, ``Content-Length``, and the ``model_version`` field found
by a byte search instead of a JSON parse. Everything runs in protocol callbacks: no task per request.

It speaks only the subset of HTTP/1.1 that JSON APIs answer with (a ``Content-Length`` body, no chunked
encoding); anything else is reported as a ``protocol`` error rather than guessed at.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

VERSION_KEY = b'"model_version":'

Done = Callable[["Connection", float, str, str | None], None]
"""Callback ``(connection, scheduled_at, outcome, model_version)``; outcome is ``"ok"`` or an error key."""


def build_request(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[str, int, bytes]:
    """``(host, port, raw request bytes)`` for POSTing ``body`` to ``url`` on a keep-alive connection."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def find_version(body: bytes) -> str | None:
    """The ``model_version`` string of a JSON answer, found without parsing the whole document."""
    i = body.find(VERSION_KEY)
    if i < 0:
        return None
    start = body.find(b'"', i + len(VERSION_KEY))
    end = body.find(b'"', start + 1)
    if start < 0 or end < 0 or body[i + len(VERSION_KEY) : start].strip():
        return None
    return body[start + 1 : end].decode(errors="replace")


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying at most one request at a time."""

    def __init__(self, on_done: Done, on_lost: Callable[[Connection], None]) -> None:
        self.on_done = on_done
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.busy_since: float | None = None
        """Scheduled send time of the request in flight (``None``: idle)."""
        self._buf = bytearray()
        self._need: int | None = None
        self._body_at = 0
        self._status = ""
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, scheduled_at: float) -> None:
        self.busy_since = scheduled_at
        self._buf.clear()
        self._need = None
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if self.busy_since is None:
            self.abort()  # bytes nobody asked for: the stream is out of step
            return
        self._buf += data
        if self._need is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).lower()
            self._status = head[9:12].decode(errors="replace")
            i = head.find(b"\r\ncontent-length:")
            if i < 0 or not head.startswith(b"http/1.1 "):
                scheduled = self.busy_since
                self.abort()  # first, so the caller cannot reuse a connection that is out of step
                self.on_done(self, scheduled, "protocol", None)
                return
            j = head.find(b"\r\n", i + 2)
            self._body_at = end + 4
            self._need = self._body_at + int(head[i + 17 : j if j > 0 else None])
        if len(self._buf) >= self._need:
            body = bytes(self._buf[self._body_at : self._need])
            if self._status == "200":
                self._finish("ok", find_version(body))
            else:
                self._finish(self._status, None)

    def _finish(self, outcome: str, version: str | None) -> None:
        scheduled = self.busy_since
        self.busy_since = None
        if scheduled is not None:
            self.on_done(self, scheduled, outcome, version)

    @property
    def closed(self) -> bool:
        return self._closed

    def abort(self) -> None:
        """Drop the connection; a request still on it is reported by whoever calls this."""
        self.busy_since = None
        if self.transport is not None and not self._closed:
            self._closed = True
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self.busy_since is not None:
            self._finish("connection", None)
        self.on_lost(self)
