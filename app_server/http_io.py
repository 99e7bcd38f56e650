"""Reading requests and writing JSON answers, the same way on every route: bodies bounded while they
are read, the deadline header checked, JSON encoded by orjson."""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

import orjson
from fastapi import Request, Response
from starlette.requests import ClientDisconnect

from app_server import metrics
from shared.errors import ClientDisconnected, InvalidInput, TooLarge

MAX_TIMEOUT_MS = 60_000.0
# Request ids: 32 hex digits like a uuid4's, but one random prefix per process and a counter, because
# uuid4 reads the kernel's random source on every request (a measurable share of the app server's CPU).
# The prefix keeps ids unique across app server replicas and restarts.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4)))


def _new_id_prefix() -> None:
    """A forked child (a process manager forking app servers) must not repeat its parent's ids."""
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_id_prefix)
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def new_request_id() -> str:
    """An id for a request that came without one."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def budget_s(request: Request, default_ms: float) -> float:
    """The request's deadline budget: ``X-Timeout-Ms``, else ``default_ms``."""
    raw = request.headers.get("x-timeout-ms")
    if raw is None:
        return default_ms / 1000
    # A decimal number as JSON writes one (what the document declares), not whatever float() takes:
    # "nan", "inf" and "1_000" are refused.
    ms = float(raw) if _DECIMAL.fullmatch(raw) else -1.0
    if not 0 < ms <= MAX_TIMEOUT_MS:
        raise InvalidInput(f"headers.X-Timeout-Ms: expected a number of milliseconds in (0, {MAX_TIMEOUT_MS:.0f}]")
    return ms / 1000


async def read_body(request: Request, max_bytes: int) -> bytearray:
    """The request body, refused with 413 as soon as it passes ``max_bytes`` (never buffered past it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"body: {declared} bytes, at most {max_bytes}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise TooLarge(f"body: more than {max_bytes} bytes")
    except ClientDisconnect:
        metrics.CLIENT_DISCONNECTS.inc()
        raise ClientDisconnected(f"client left after {len(body)} bytes of the body") from None
    return body


async def read_json(request: Request, max_bytes: int) -> Any:
    body = await read_body(request, max_bytes)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: invalid JSON ({exc})") from None
