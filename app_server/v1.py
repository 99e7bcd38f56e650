"""Tandem's own HTTP API: predictions by model name, the models served, health and readiness.

``POST /v1/models/{name}/predict`` scores instances with model ``name``; ``POST /predict`` does the same
for the default model (``--default-model``, else the only model served). Errors are rendered by
:mod:`app_server.error_render`; which names are models, and which answer 404 or 503, is
:mod:`app_server.catalog`'s to say.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request, Response

from app_server import metrics, traffic
from app_server.api_models import Healthy, ModelEntry, ModelList, PredictAnswer, Ready, responses
from app_server.catalog import ModelCatalog
from app_server.disconnect import DisconnectWatch
from app_server.http_io import budget_s, json_response, new_request_id, read_json
from app_server.http_metrics import label_model
from app_server.predict import Predictor
from app_server.schemas import PREDICTION_HEADERS, predict_body_schema
from shared.errors import NoWorkers, TandemError

logger = logging.getLogger(__name__)

router = APIRouter()

PREDICT_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": predict_body_schema({"type": "object"}, None)}},
    },
    "parameters": PREDICTION_HEADERS,
}
"""Both predict routes' body and headers. A model's own fields are documented per model, by
:mod:`app_server.openapi`: this generic body is what a name not yet served when the document was made
(a ``*`` worker loads models on demand) can be sent; :mod:`app_server.openapi` bounds its instances by
the app server's ``--max-instances``."""
PREDICT_RESPONSES = responses(PredictAnswer, (404, 413, 422, 500, 503, 504), request_id=True)


def _predictor(request: Request) -> Predictor:
    return request.app.state.predictor


def _catalog(request: Request) -> ModelCatalog:
    return request.app.state.catalog


def _request_id(request: Request) -> str:
    request_id = request.headers.get("x-request-id") or new_request_id()
    request.state.request_id = request_id
    return request_id


@router.post("/predict", openapi_extra=PREDICT_DOC, responses=PREDICT_RESPONSES)
async def predict(request: Request) -> Response:
    """Score instances with the default model (``--default-model``, else the only model served).

    Headers: ``X-Request-ID`` (echoed, generated if absent), ``X-Timeout-Ms`` (deadline budget).
    """
    request_id = _request_id(request)
    model = _catalog(request).default()
    label_model(request, model)
    return await _predict(request, model, request_id)


@router.post("/v1/models/{name}/predict", openapi_extra=PREDICT_DOC, responses=PREDICT_RESPONSES)
async def predict_model(request: Request, name: str) -> Response:
    """Score instances with model ``name``, on the version the serving worker holds.

    Headers: ``X-Request-ID`` (echoed, generated if absent), ``X-Timeout-Ms`` (deadline budget).
    """
    request_id = _request_id(request)
    model = _catalog(request).resolve(name)
    label_model(request, model)
    return await _predict(request, model, request_id)


async def _predict(request: Request, model: str, request_id: str) -> Response:
    t0 = time.monotonic()
    predictor = _predictor(request)
    settings = predictor.settings
    deadline = time.monotonic() + budget_s(request, settings.timeout_ms)
    instances = predictor.check_body(await read_json(request, settings.max_body_bytes))
    watch = DisconnectWatch(request)
    try:
        result = await predictor.predict(model, instances, request_id, deadline, request.headers)
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
                "variant": result.get("variant"),
                "duration_ms": round(elapsed_ms, 3),
                "instances": len(instances),
            },
        )
    return json_response(result, headers={"X-Request-ID": request_id})


@router.get("/healthz", responses=responses(Healthy, (500,)))
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", responses=responses(Ready, (500, 503)))
async def readyz(request: Request) -> Response:
    """Ready when every model the settings name has a live worker; with none named (no ``--models``,
    or only ``*``, and no default), when any model has one. See ``ModelCatalog.readiness``."""
    catalog = _catalog(request)
    live, missing = catalog.readiness()
    if missing:  # answered directly, not raised: probes poll this and must not flood the log
        err = NoWorkers(f"no live worker serves {', '.join(missing)} yet")
        return json_response(err.to_body(), err.http_status, {"Retry-After": "1"})
    return json_response({"status": "ready", "workers": catalog.live_workers(), "models": live})


@router.get("/v1/models", responses=responses(ModelList, (500,)))
async def models(request: Request) -> Response:
    """Every model served: its newest live version, feature spec, an instance a caller can send as is,
    its signature, and what each worker serving it holds."""
    catalog = _catalog(request)
    entries = await asyncio.gather(*(model_entry(catalog, m) for m in catalog.names()))
    return json_response({"models": entries})


@router.get("/v1/models/{name}", responses=responses(ModelEntry, (404, 500)))
async def model(request: Request, name: str) -> Response:
    """One model's entry of ``GET /v1/models``; a known model nobody serves right now is listed with
    ``version: null`` (as in the list), not refused."""
    catalog = _catalog(request)
    model = catalog.resolve(name)
    label_model(request, model)
    return json_response(await model_entry(catalog, model))


async def model_entry(catalog: ModelCatalog, model: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": model,
        "version": None,
        "feature_spec": None,
        "signature": None,
        "flavour": None,
        "input_example": [],
        "inputs": None,
        "outputs": None,
        "device": None,
        "workers": [c.model_info(model) for c in catalog.pool.conns.values() if model in c.models],
        "traffic": traffic.describe(traffic.policy_for(catalog.pool, model)),
    }
    try:
        version, desc = await catalog.describe(model)
    except TandemError as exc:  # a listing shows what is known; a model nobody can describe now is still in it
        logger.debug("GET /v1/models: %s not described: %s", model, exc)
        return entry
    entry.update(
        version=version,
        feature_spec=desc.get("feature_spec"),
        signature=desc.get("signature"),
        flavour=desc.get("flavour"),
        input_example=desc.get("input_example") or [],
        inputs=desc.get("inputs"),
        outputs=desc.get("outputs"),
        device=desc.get("device"),
    )
    return entry
