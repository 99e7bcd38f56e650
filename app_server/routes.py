"""HTTP routes of the app server (DESIGN §3)."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from starlette.requests import ClientDisconnect

from app_server import metrics
from app_server.predict import Predictor
from shared.errors import ClientDisconnected, InvalidInput, NoWorkers, TooLarge
from shared.features import FeatureSpec

logger = logging.getLogger(__name__)

router = APIRouter()

MAX_TIMEOUT_MS = 60_000.0
DISCONNECT_WATCH_AFTER_S = 0.02


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _predictor(request: Request) -> Predictor:
    return request.app.state.predictor


def budget_s(request: Request, default_ms: float) -> float:
    raw = request.headers.get("x-timeout-ms")
    if raw is None:
        return default_ms / 1000
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
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


@router.post(
    "/predict",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["instances"],
                        "properties": {"instances": {"type": "array", "items": {"type": "object"}, "minItems": 1}},
                    }
                }
            },
        }
    },
)
async def predict(request: Request) -> Response:
    """Score instances with the model version the serving worker holds.

    Headers: ``X-Request-ID`` (echoed, generated if absent), ``X-Timeout-Ms`` (deadline budget).
    """
    t0 = time.monotonic()
    predictor = _predictor(request)
    settings = predictor.settings
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    request.state.request_id = request_id
    deadline = time.monotonic() + budget_s(request, settings.timeout_ms)
    instances = predictor.check_body(await read_json(request, settings.max_body_bytes))
    watch = DisconnectWatch(request)
    try:
        result = await predictor.predict(instances, request_id, deadline)
    except asyncio.CancelledError:
        if not watch.fired:
            raise
        # The caller left: the cancellation reached the worker as a cancel message, so a request still
        # queued there is dropped instead of computed for nobody.
        watch.task.uncancel()
        metrics.CLIENT_DISCONNECTS.inc()
        logger.info("request %s: client disconnected; cancelled", request_id, extra={"request_id": request_id})
        return Response(status_code=499)
    finally:
        watch.stop()
    elapsed_ms = (time.monotonic() - t0) * 1000
    if settings.log_requests or elapsed_ms >= settings.slow_request_ms:
        logger.info(
            "predict %s answered in %.1f ms",
            request_id,
            elapsed_ms,
            extra={
                "request_id": request_id,
                "model": result["model"],
                "model_version": result["model_version"],
                "duration_ms": round(elapsed_ms, 3),
                "instances": len(instances),
            },
        )
    return json_response(result, headers={"X-Request-ID": request_id})


class DisconnectWatch:
    """Cancels the current task when its client goes away, once the request has run for a while.

    The watcher (a task awaiting ``receive()``, which only yields ``http.disconnect`` once the body is
    read) starts after ``DISCONNECT_WATCH_AFTER_S``: most requests are answered sooner, and a task per
    request was a measurable share of the app server's CPU at thousands of requests per second. A
    caller that leaves is noticed at most that much later, well before a queued request would run.

    The watcher is never cancelled, and nothing here holds it but ``WATCHERS``: ASGI servers answer
    ``receive()`` with ``http.disconnect`` once the response is sent, which ends it, and ``stop()``
    has marked it stopped by then. An earlier version kept the task on this object and cancelled it:
    the CancelledError's traceback held the frame, the frame this object, this object the task, a
    reference cycle per watched request. At 3,000 requests/s that garbage made 20-30 ms collector
    pauses every two seconds, most of the p99 tail.
    """

    def __init__(self, request: Request, after_s: float = DISCONNECT_WATCH_AFTER_S) -> None:
        self.task = asyncio.current_task()
        self.fired = False
        self.stopped = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(after_s, self._start, request)

    def _start(self, request: Request) -> None:
        self._timer = None
        WATCHERS.add(asyncio.ensure_future(self._watch(request)))

    async def _watch(self, request: Request) -> None:
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the connection's state is gone (server shutting down): nothing to watch
            return
        finally:
            WATCHERS.discard(asyncio.current_task())
        if not self.stopped and self.task is not None and not self.task.done():
            self.fired = True
            self.task.cancel()

    def stop(self) -> None:
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()


WATCHERS: set[asyncio.Future[None]] = set()
"""Running watchers, held here: the event loop keeps only weak references to tasks."""


@router.get("/healthz")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    predictor = _predictor(request)
    ready = len(predictor.pool.candidates(predictor.settings.model))
    if not ready:  # answered directly, not raised: probes poll this and must not flood the log
        err = NoWorkers(f"no live worker serves model {predictor.settings.model!r} yet")
        return json_response(err.to_body(), err.http_status, {"Retry-After": "1"})
    return json_response({"status": "ready", "workers": ready})


@router.get("/v1/models")
async def models(request: Request) -> Response:
    """What is served, what each known worker holds, and an instance a caller can send as is."""
    predictor = _predictor(request)
    model = predictor.settings.model
    pool = predictor.pool
    entry: dict[str, Any] = {
        "name": model,
        "version": None,
        "feature_spec": None,
        "input_example": [],
        "workers": [
            {
                "endpoint": c.endpoint,
                "alive": c.alive,
                "live": c.live_versions.get(model),
                "versions": c.resident.get(model, []),
            }
            for c in pool.conns.values()
        ],
    }
    served = await _newest_description(predictor)
    if served is not None:
        version, desc = served
        entry.update(
            version=version,
            feature_spec=desc["feature_spec"],
            input_example=desc["input_example"],
            device=desc.get("device"),
        )
    return json_response({"models": [entry]})


async def _newest_description(predictor: Predictor) -> tuple[str, dict[str, Any]] | None:
    """Version and describe() of the newest version any live worker serves, or None if none does."""
    model = predictor.settings.model
    candidates = predictor.pool.candidates(model)
    if not candidates:
        return None
    newest = max(candidates, key=lambda c: int(c.live_versions[model] or 0))
    version = newest.live_versions[model] or ""
    return version, await predictor.pool.describe(newest, model, version)


def install_openapi(app: FastAPI) -> None:
    """Serve an OpenAPI document whose ``/predict`` body shows the served version's fields.

    The feature spec is known only at runtime, from the workers, and FastAPI builds its document once
    and synchronously. So ``/openapi.json`` (which ``/docs`` reads) is replaced by an async route that
    asks a worker for the newest version's spec and patches the static document; until a worker is
    up it serves the static one. One document is kept per version.
    """
    url = app.openapi_url or "/openapi.json"
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != url]
    documents: dict[str, dict[str, Any]] = {}

    @app.get(url, include_in_schema=False)
    async def openapi_document(request: Request) -> Response:
        predictor = _predictor(request)
        try:
            served = await _newest_description(predictor)
        except Exception as exc:  # the static document is still useful without the model's fields
            logger.warning("OpenAPI: could not describe the served version (%s)", exc)
            served = None
        if served is None:
            return json_response(app.openapi())
        version, desc = served
        if version not in documents:
            documents[version] = with_instance_schema(app.openapi(), version, desc, predictor)
        return json_response(documents[version])


def with_instance_schema(
    base: dict[str, Any], version: str, desc: dict[str, Any], predictor: Predictor
) -> dict[str, Any]:
    """A copy of ``base`` whose /predict request body documents one version's instance fields."""
    doc = copy.deepcopy(base)
    spec = FeatureSpec.model_validate(desc["feature_spec"])
    instance = spec.instance_model.model_json_schema()
    for f in spec.features:
        prop = instance["properties"][f.name]
        note = f"{f.type} feature; " + (
            f"default {f.default!r}" if f.default is not None else "no default: required unless stored for the entity"
        )
        if f.type == "categorical":
            note += f"; vocabulary {f.vocabulary}, anything else is out-of-vocabulary"
        prop["description"] = f"{prop['description']} ({note})" if prop.get("description") else note
    model = predictor.settings.model
    instance["title"] = f"{model} v{version} instance"
    doc.setdefault("components", {}).setdefault("schemas", {})["PredictInstance"] = instance
    post = doc["paths"]["/predict"]["post"]
    body = post["requestBody"]["content"]["application/json"]
    body["schema"] = {
        "type": "object",
        "required": ["instances"],
        "additionalProperties": False,
        "properties": {
            "instances": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/PredictInstance"},
                "minItems": 1,
                "maxItems": predictor.settings.max_instances,
            }
        },
    }
    if desc.get("input_example"):
        body["example"] = {"instances": desc["input_example"][:2]}
    post["description"] = (
        f"{post.get('description', '')}\n\nInstances are validated against the feature spec of {model} "
        f"v{version}, the newest version a worker serves."
    ).strip()
    return doc
