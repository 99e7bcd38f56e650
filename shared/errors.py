"""One exception tree for the whole system, and the one place that maps it to HTTP and wire statuses.

A worker raises, the wire carries a status string, the app server turns that status back into the same
exception class, and the HTTP layer renders it: a failure keeps its meaning across both hops.
"""

from __future__ import annotations

from typing import Any


class TandemError(Exception):
    http_status: int = 500
    code: str = "internal_error"
    wire_status: str = "error"
    retry_after_s: float | None = None

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class ConfigError(TandemError):
    """A setting, or a file one names, is wrong: the process refuses to start rather than run otherwise
    than configured (a worker whose CURVE keys cannot be read would otherwise be open to anyone)."""

    code = "config_error"


class InvalidInput(TandemError):
    http_status, code, wire_status = 422, "invalid_input", "bad_request"


class TooLarge(TandemError):
    http_status, code, wire_status = 413, "too_large", "bad_request"


class Overloaded(TandemError):
    http_status, code, wire_status, retry_after_s = 503, "overloaded", "overloaded", 1.0


class NoWorkers(TandemError):
    http_status, code, wire_status, retry_after_s = 503, "no_workers", "error", 1.0


class FeatureStoreUnavailable(TandemError):
    http_status, code, wire_status, retry_after_s = 503, "feature_store_unavailable", "error", 1.0


class DeadlineExceeded(TandemError):
    http_status, code, wire_status = 504, "deadline_exceeded", "deadline_exceeded"


class VersionUnavailable(TandemError):
    """The worker no longer holds the version a request was encoded for; the app re-encodes."""

    http_status, code, wire_status, retry_after_s = 503, "version_unavailable", "version_unavailable", 1.0


class ModelError(TandemError):
    http_status, code, wire_status = 500, "model_error", "error"


class ProtocolError(TandemError):
    """A frame that cannot be parsed: answered with ``bad_request``, never a crash."""

    http_status, code, wire_status = 500, "protocol_error", "bad_request"


class ClientDisconnected(TandemError):
    """The caller left while its request was still being read: nobody will see the answer, but the
    access metrics should say why it ended (499, as nginx counts it), not count a server error."""

    http_status, code = 499, "client_disconnected"


class ModelNotFound(TandemError):
    """No worker serves a model of that name (or this worker does not, on the wire)."""

    http_status, code, wire_status = 404, "model_not_found", "model_not_found"


class ModelLoading(TandemError):
    """The model was unloaded to stay within a worker's memory budget and is loading again; it could
    not be ready within the request's budget. Retry after ``retry_after_s``."""

    http_status, code, wire_status, retry_after_s = 503, "model_loading", "model_loading", 1.0


class Unauthorized(TandemError):
    """No API key, or one the app server does not know (``--api-keys-file``). Never on the wire."""

    http_status, code = 401, "unauthorized"


class RateLimited(TandemError):
    """The request's API key is over its requests-per-second limit; retry after ``retry_after_s``."""

    http_status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class IntegrityError(ModelError):
    """A version's files are not the ones registered with it (changed, missing or added since), or carry
    no record to check them against on a worker that requires one. Never served; the message names the
    files."""

    code = "integrity"


_FROM_WIRE: dict[str, type[TandemError]] = {
    "overloaded": Overloaded,
    "deadline_exceeded": DeadlineExceeded,
    "version_unavailable": VersionUnavailable,
    "bad_request": ProtocolError,
    "error": ModelError,
    "model_not_found": ModelNotFound,
    "model_loading": ModelLoading,
}


def from_wire(status: str, message: str) -> TandemError:
    """The exception a non-ok wire reply stands for."""
    return _FROM_WIRE.get(status, ModelError)(message or status)
