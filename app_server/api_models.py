"""What the OpenAPI document says each route answers: the body of every status, and its headers.

The handlers build their answers by hand (orjson, no response models on the hot path), so these models
only document them; a schema-driven fuzzer (``tests/e2e/test_openapi_fuzz.py``) checks every answer it
provokes against them, which is what keeps the two in step. Models forbid extra fields, so a field a
handler adds without documenting it fails that check instead of slipping through.

Every route lists each status it can answer, with the error shape its prefix speaks
(:mod:`app_server.error_render`): ``{"error": {"code", "message", "details"}}`` outside ``/v2``,
``{"error": "..."}`` under it. 499 (the caller left) is never seen by a caller and is not listed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.features import FeatureSpec


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Doc):
    loc: str = Field(description="Where in the request: `instances[3].amount`, `headers.X-Timeout-Ms`.")
    msg: str


class ErrorInfo(_Doc):
    code: str = Field(
        description="invalid_input, too_large, model_not_found, not_found, method_not_allowed, no_workers, "
        "overloaded, model_loading, version_unavailable, feature_store_unavailable, deadline_exceeded, "
        "model_error, protocol_error, internal_error; with API keys on, unauthorized and rate_limited"
    )
    message: str
    details: list[ErrorDetail] | None = Field(None, description="Every failing field (invalid input only).")


class ErrorV1(_Doc):
    """An error outside ``/v2``."""

    error: ErrorInfo


class ErrorV2(_Doc):
    """An error under ``/v2``, in the Open Inference Protocol's shape."""

    error: str


class PredictAnswer(_Doc):
    predictions: list[float | list[float | None] | None] = Field(
        description="One per instance, in order: a number for a model with one output column, else a list. "
        "null where the model computed NaN (inputs far outside what it was trained on)."
    )
    model: str
    model_version: str
    variant: Literal["production", "canary"] = Field(
        "production", description="Which variant of the model's traffic policy computed the answer."
    )
    request_id: str


class Healthy(_Doc):
    status: Literal["ok"]


class Ready(_Doc):
    status: Literal["ready"]
    workers: int = Field(description="Live workers, each counted once whatever it serves.")
    models: dict[str, int] = Field(description="Live workers per known model.")


class TensorMeta(_Doc):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size (the batch dimension).")


class RefusedVersion(_Doc):
    version: str
    error: str = Field(description="Why it failed: the load, the check on its input example, a missing library.")
    attempts: int
    retry_in_s: float


class WorkerInfo(_Doc):
    endpoint: str
    alive: bool
    live: str | None = Field(description="The version this worker serves new requests with.")
    versions: list[str] = Field(description="Versions it holds (a replaced one stays a while).")
    loaded: bool = Field(description="False while unloaded to stay within its memory budget.")
    refused: RefusedVersion | None = Field(
        None, description="A version the registry names that this worker failed to load, and why; it keeps "
        "serving `live` meanwhile and retries with back-off."
    )  # fmt: skip


class ModelEntry(_Doc):
    name: str
    version: str | None = Field(description="Newest live version; null while no live worker serves the model.")
    feature_spec: FeatureSpec | None
    signature: list[dict[str, Any]] | None = Field(
        None, description="For a model served from its MLflow signature (no feature spec): its columns."
    )
    flavour: str | None = Field(None, description="The MLflow flavour it runs through (signature models).")
    input_example: list[dict[str, Any]] = Field(description="Instances a caller can send as they are.")
    inputs: list[TensorMeta] | None
    outputs: list[TensorMeta] | None
    device: str | None
    workers: list[WorkerInfo]
    traffic: dict[str, Any] | None = Field(
        None,
        description="The traffic policy in force: versions per variant (production, canary, shadow), "
        "canary_percent, shadow_percent, sticky; null when no worker reports one.",
    )


class ModelList(_Doc):
    models: list[ModelEntry]


class Live(_Doc):
    live: bool


class ServerReady(_Doc):
    ready: bool


class ServerMetadata(_Doc):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(_Doc):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


class ConfigTensor(_Doc):
    name: str
    data_type: str
    dims: list[int]


class ModelConfig(_Doc):
    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]


class ModelReady(_Doc):
    name: str
    ready: bool


class BinarySize(_Doc):
    binary_data_size: int


class OutputTensor(_Doc):
    name: str
    datatype: str
    shape: list[int]
    data: list[float | bool | None] | None = Field(None, description="Row-major; absent when sent as binary.")
    parameters: BinarySize | None = Field(None, description="Present when the tensor follows as raw bytes.")


class InferAnswer(_Doc):
    model_name: str
    model_version: str
    id: str = Field(description="The request's `id`, else its request id.")
    outputs: list[OutputTensor]


# -- responses ------------------------------------------------------------------------------------

_HEADER_TEXT = {
    "X-Request-ID": "The request's id: the X-Request-ID sent, else one generated (v2: else the body's `id`).",
    "Retry-After": "Seconds to wait before retrying.",
    "Allow": "The methods this path takes.",
    "Inference-Header-Content-Length": "Length of the JSON header before the binary output tensors.",
}
_HEADER_SCHEMA = {"Retry-After": {"type": "integer", "minimum": 1}}

_WHEN = {
    200: "Answered.",
    400: "Invalid input: the body, a tensor or a header (X-Timeout-Ms) does not fit; `error` says where.",
    404: "No model of that name (or no such version held), or no such path.",
    405: "The path takes other methods (Allow lists them).",
    413: "Too large: the body's bytes, or more instances/rows than one request may carry.",
    422: "Invalid input (`invalid_input`): `details` names every failing field.",
    500: "The model failed (`model_error`) or the app server did (`internal_error`).",
    503: "Not now: no live worker serves the model (`no_workers`), overloaded, the model is loading, or "
    "the feature store is unreachable. Retry after Retry-After.",
    504: "The request's deadline (X-Timeout-Ms, default --timeout-ms) passed before an answer.",
}


def _headers(names: dict[str, bool]) -> dict[str, Any]:
    return {
        n: {"description": _HEADER_TEXT[n], "required": req, "schema": _HEADER_SCHEMA.get(n, {"type": "string"})}
        for n, req in names.items()
    }


def responses(
    ok: type[BaseModel] | None,
    errors: tuple[int, ...],
    *,
    v2: bool = False,
    request_id: bool | None = None,
    ok_503: type[BaseModel] | None = None,
    binary_ok: bool = False,
) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: 200 with ``ok``, each of ``errors`` with the route's error shape,
    and 405 with ``Allow`` (any other method on the path). ``request_id``: X-Request-ID on every answer
    (True), on 200 and optionally on errors (False), never (None). ``ok_503``: a 503 that is a status
    body rather than an error (readiness)."""
    error_model = ErrorV2 if v2 else ErrorV1
    rid_ok = {"X-Request-ID": True} if request_id is not None else {}
    rid_err = {"X-Request-ID": bool(request_id)} if request_id is not None else {}
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": _WHEN[200], "headers": _headers(rid_ok)}
        if binary_ok:
            out[200]["content"] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
            out[200]["headers"] |= _headers({"Inference-Header-Content-Length": False})
    for status in errors:
        headers = dict(rid_err) | ({"Retry-After": True} if status == 503 else {})
        model = ok_503 if status == 503 and ok_503 is not None else error_model
        out[status] = {"model": model, "description": _WHEN[status], "headers": _headers(headers)}
    out[405] = {"model": error_model, "description": _WHEN[405], "headers": _headers({"Allow": True})}
    return out
