"""Every error answer of the app server, rendered in one place and in the shape its route speaks.

Routes under ``/v2`` answer in the Open Inference Protocol's shape, ``{"error": "<message>"}``, with
invalid input as 400 (the protocol's rule); every other route answers ``{"error": {"code", "message",
"details"}}`` with invalid input as 422. Status codes, ``Retry-After`` and ``X-Request-ID`` come from
the one exception tree of :mod:`shared.errors` whichever the shape. Both the routed application and the
prediction fast path render through :func:`error_response`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from app_server.http_io import json_response
from shared.errors import InvalidInput, TandemError

logger = logging.getLogger(__name__)

V2_PREFIX = "/v2"

_MESSAGES = {
    "float_type": "expected number",
    "finite_number": "expected a finite number",
    "string_type": "expected string",
    "bool_type": "expected boolean",
    "int_type": "expected integer",
    "extra_forbidden": "unknown field",
    "missing": "required",
    "list_type": "expected a list",
    "model_type": "expected an object",
    "dict_type": "expected an object",
    "too_short": "must not be empty",
}


def format_loc(loc: tuple[Any, ...]) -> str:
    """``instances[3].amount``; a key that is not a plain name is quoted (``instances[0]["a.b"]``) so
    the path stays unambiguous whatever keys a caller sends."""
    path = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "int", "float", "bool") and isinstance(prev, str):
            continue  # after a field name, pydantic names the union member it tried; callers do not care
        elif path and not str(part).isidentifier():
            path += f"[{orjson.dumps(str(part)).decode()}]"
        else:
            path += f".{part}" if path else str(part)
        prev = part
    return path


def validation_error(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> InvalidInput:
    """A pydantic failure as a 422 naming every failing field by its path (first one in the message)."""
    return invalid_input(exc.errors(include_url=False), prefix)


def invalid_input(errors: Iterable[Any], prefix: tuple[Any, ...] = ()) -> InvalidInput:
    details = []
    seen: set[str] = set()
    for err in errors:
        loc = format_loc(prefix + tuple(err["loc"]))
        if loc in seen:
            continue
        seen.add(loc)
        details.append({"loc": loc, "msg": _MESSAGES.get(err.get("type", ""), err.get("msg", "invalid"))})
    if not details:
        return InvalidInput("body: invalid")
    first = details[0]
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return InvalidInput(f"{first['loc']}: {first['msg']}{more}", details=details)


def speaks_v2(scope: dict[str, Any]) -> bool:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_response(request: Request, exc: Exception, *, log: bool = True) -> Response:
    """The answer to ``exc`` raised while serving ``request``; anything outside the exception tree is a
    500 ``internal_error`` whose details stay in the log. ``log=False``: a refusal that is counted
    instead (API keys: a flood of bad or throttled requests must not flood the log too)."""
    headers: dict[str, str] = {}
    if isinstance(exc, RequestValidationError):
        exc = invalid_input(exc.errors())
    if isinstance(exc, TandemError):
        status, code, message, details = exc.http_status, exc.code, exc.message, exc.details
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))  # never sooner than asked
    elif isinstance(exc, HTTPException):
        status, message, details = exc.status_code, str(exc.detail), None
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        headers.update(exc.headers or {})
    else:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        status, code, message, details = 500, "internal_error", "internal error", None
    v2 = speaks_v2(request.scope)
    if v2 and isinstance(exc, InvalidInput):
        status = 400
    rid = getattr(request.state, "request_id", None)
    if rid:
        headers["X-Request-ID"] = rid
    if log and isinstance(exc, TandemError):
        log_at = logger.warning if status < 500 or status in (503, 504) else logger.error
        log_at("%s %s -> %d %s: %s", request.method, request.url.path, status, code, message, extra={"request_id": rid})
    if v2:
        return json_response({"error": message}, status, headers)
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return json_response({"error": error}, status, headers)
