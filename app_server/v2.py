"""The Open Inference Protocol (KServe v2 / Triton HTTP) on the app server, for already-encoded tensors.

Standard clients and load tools (``tritonclient``, ``perf_analyzer``, KServe clients) call Tandem
unchanged. Requests go through the same worker pool, batching, deadlines and retries as ``/predict``
(:class:`~app_server.failover.Dispatcher`); only the body format (:mod:`app_server.v2_tensors`) differs.
Every ``/v2/models/{name}`` route routes by ``name`` like the rest of the app server: 404 for a name no
worker or setting knows, 503 with ``Retry-After`` for a known model no live worker serves. Errors are in
the v2 shape ``{"error": "..."}`` (:mod:`app_server.error_render`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from app_server import metrics
from app_server.api_models import (
    InferAnswer,
    Live,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    ServerMetadata,
    ServerReady,
    responses,
)
from app_server.catalog import ModelCatalog
from app_server.failover import Dispatcher, Prepared
from app_server.http_io import new_request_id
from app_server.http_metrics import label_model
from app_server.predict import Predictor
from app_server.schemas import PREDICTION_HEADERS
from app_server.v2_columns import decode_columns
from app_server.v2_tensors import (
    HEADER_LENGTH,
    HEADER_SAFE,
    deadline_of,
    decode_input,
    infer_body_schema,
    parse_request,
    read_v2_body,
    render_outputs,
    requested_outputs,
)
from app_server.worker_conn import WorkerConn
from app_server.workers import WorkerLost
from shared.errors import DeadlineExceeded, InvalidInput, ModelError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v2", tags=["v2"])

METADATA_RESPONSES = responses(ModelMetadata, (404, 500, 503), v2=True)
CONFIG_RESPONSES = responses(ModelConfig, (404, 500, 503), v2=True)
READY_RESPONSES = responses(ModelReady, (404, 500, 503), v2=True, ok_503=ModelReady)
INFER_RESPONSES = responses(InferAnswer, (400, 404, 413, 500, 503, 504), v2=True, request_id=False, binary_ok=True)
INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": infer_body_schema(None, None, None)}},
    },
    "parameters": PREDICTION_HEADERS,
}
"""The generic body of both infer routes; each model's own tensor is documented per model by
:mod:`app_server.openapi`, which also bounds the rows by the app server's ``--max-instances``."""


def _body(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _catalog(request: Request) -> ModelCatalog:
    return request.app.state.catalog


def _model(request: Request, name: str) -> str:
    """The model ``name`` names (404 if none), counted under it in the HTTP metrics."""
    model = _catalog(request).resolve(name)
    label_model(request, model)
    return model


# -- health and metadata ----------------------------------------------------------------------------


@router.get("/health/live", responses=responses(Live, (500,), v2=True))
async def live() -> Response:
    return _body({"live": True})


@router.get("/health/ready", responses=responses(ServerReady, (500, 503), v2=True, ok_503=ServerReady))
async def ready(request: Request) -> Response:
    """The readiness of ``/readyz``."""
    _, missing = _catalog(request).readiness()
    if not missing:
        return _body({"ready": True})
    return _body({"ready": False}, 503, {"Retry-After": "1"})


@router.get("", responses=responses(ServerMetadata, (500,), v2=True))
async def server_metadata() -> Response:
    return _body({"name": "tandem", "version": "0.1.0", "extensions": ["binary_tensor_data"]})


async def _metadata(request: Request, name: str, version: str | None) -> Response:
    model = _model(request, name)
    catalog = _catalog(request)
    _, desc = await catalog.describe(model, version)
    return _body(
        {
            "name": model,
            "versions": catalog.versions(model),
            "platform": desc.get("platform", "onnxruntime"),
            "inputs": desc["inputs"],
            "outputs": desc["outputs"],
        }
    )


@router.get("/models/{name}", responses=METADATA_RESPONSES)
async def model_metadata(request: Request, name: str) -> Response:
    return await _metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", responses=METADATA_RESPONSES)
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return await _metadata(request, name, version)


async def _config(request: Request, name: str, version: str | None) -> Response:
    """Triton's model configuration, the part ``perf_analyzer`` reads (batching on the first dimension)."""
    model = _model(request, name)
    catalog = _catalog(request)
    _, desc = await catalog.describe(model, version)

    def tensors(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"][1:]} for t in specs]

    return _body(
        {
            "name": model,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": catalog.settings.max_instances,
            "input": tensors(desc["inputs"]),
            "output": tensors(desc["outputs"]),
        }
    )


@router.get("/models/{name}/config", responses=CONFIG_RESPONSES)
async def model_config(request: Request, name: str) -> Response:
    return await _config(request, name, None)


@router.get("/models/{name}/versions/{version}/config", responses=CONFIG_RESPONSES)
async def model_version_config(request: Request, name: str, version: str) -> Response:
    return await _config(request, name, version)


def _ready(request: Request, name: str, version: str | None) -> Response:
    model = _model(request, name)
    if _catalog(request).holders(model, version):
        return _body({"name": model, "ready": True})
    return _body({"name": model, "ready": False}, 503, {"Retry-After": "1"})


@router.get("/models/{name}/ready", responses=READY_RESPONSES)
async def model_ready(request: Request, name: str) -> Response:
    return _ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses=READY_RESPONSES)
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    return _ready(request, name, version)


# -- inference ------------------------------------------------------------------------------------


@router.post("/models/{name}/infer", openapi_extra=INFER_DOC, responses=INFER_RESPONSES)
async def infer(request: Request, name: str) -> Response:
    """Run already-encoded rows through the version the chosen worker serves (JSON or binary tensors).

    ``data`` holds ``shape[0] * shape[1]`` numbers, flat and row-major or as ``shape[0]`` rows (a rule
    the schema can only bound). Besides the JSON body documented here: the binary-data extension, the
    JSON header followed by the tensor's raw little-endian bytes, with ``Inference-Header-Content-Length:
    <header length>`` and ``"parameters": {"binary_data_size": <bytes>}`` on the input instead of
    ``data``; and ``Content-Encoding: gzip`` or ``deflate``. Outputs come back as raw bytes too
    (``application/octet-stream``) when ``binary_data_output`` or an output's ``binary_data`` is true.

    Headers: ``X-Request-ID`` (echoed; the body's ``id`` or a generated one if absent, when it can be a
    header value), ``X-Timeout-Ms`` (deadline budget; ``parameters.timeout`` in microseconds wins).
    """
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", openapi_extra=INFER_DOC, responses=INFER_RESPONSES)
async def infer_version(request: Request, name: str, version: str) -> Response:
    """As ``/v2/models/{name}/infer``, on ``version`` only (a worker still holding it after a swap
    counts); 404 when no live worker holds it."""
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    request.state.request_id = request.headers.get("x-request-id")
    model = _model(request, name)
    catalog = _catalog(request)
    dispatcher: Dispatcher = request.app.state.dispatcher
    settings = catalog.settings
    header, binary = parse_request(
        await read_v2_body(request, settings.max_body_bytes), request.headers.get(HEADER_LENGTH)
    )
    req_id = header.get("id")
    # The body's id names the request when no header does, if it can be a header value: it is echoed
    # in X-Request-ID, and a newline or a non-Latin-1 character there would break the answer.
    header_id = req_id if req_id and HEADER_SAFE.fullmatch(req_id) else None
    request_id = request.state.request_id = request.state.request_id or header_id or new_request_id()
    deadline = deadline_of(request, header, settings.timeout_ms)
    # Checked against the signature of the version it will most likely run on, before any worker
    # is involved; re-checked below should a swap change the signature meanwhile.
    try:  # normally cached; asking a worker for it must not outlast the request's own deadline
        _, desc = await catalog.describe(model, version, min(2.0, max(deadline - time.monotonic(), 0.001)))
    except WorkerLost:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed waiting for the model's signature") from None
        raise
    wanted = requested_outputs(header, [o["name"] for o in desc["outputs"]])
    if desc.get("feature_spec") is None:
        return await _infer_columns(request, model, version, header, binary, desc, wanted, request_id, deadline)
    t0 = time.perf_counter()
    x = decode_input(header, binary, desc["inputs"][0], settings.max_instances)
    metrics.child(metrics.ENCODE_DURATION, model).observe(time.perf_counter() - t0)

    async def prepare(conn: WorkerConn, target: str) -> Prepared:
        sig = (await catalog.pool.describe(conn, model, target))["inputs"][0]
        if sig["name"] != desc["inputs"][0]["name"] or sig["shape"][-1] != x.shape[1]:
            if version is None:
                # Mid-rollout: this worker still (or already) serves a version with another input than
                # the one the tensor was checked against. Not the caller's fault: try another worker.
                raise WorkerLost(f"{conn.endpoint} serves v{target}, whose input differs; trying another worker")
            raise InvalidInput(f"model {model} v{target} now takes {sig['name']!r} of shape {sig['shape']}")
        return Prepared(target, x, sig["name"], wanted[0][0] if wanted else "")

    with dispatcher.admitted():
        reply, _ = await dispatcher.infer(model, prepare, request_id, deadline, version)
    assert reply is not None  # no prediction cache on this path: there is always a tensor to send
    return _answer(reply, model, wanted, req_id or request_id, request_id)


async def _infer_columns(
    request: Request, model: str, version: str | None, header: dict[str, Any], binary: bytes,
    desc: dict[str, Any], wanted: list[tuple[str, bool]], request_id: str, deadline: float,
) -> Response:  # fmt: skip
    """A signature version: its column tensors as instances, then ``/predict``'s validation and packing."""
    predictor: Predictor = request.app.state.predictor
    dispatcher: Dispatcher = request.app.state.dispatcher
    instances = decode_columns(header, binary, desc, predictor.settings.max_instances)

    async def prepare(conn: WorkerConn, target: str) -> Prepared:
        return await predictor.prepare(conn, model, target, instances)

    with dispatcher.admitted():
        reply, _ = await dispatcher.infer(model, prepare, request_id, deadline, version)
    assert reply is not None  # no prediction cache for tables
    return _answer(reply, model, wanted, header.get("id") or request_id, request_id)


def _answer(reply: Any, model: str, wanted: list[tuple[str, bool]], answer_id: str, request_id: str) -> Response:
    missing = [n for n, _ in wanted if n not in reply.tensors]
    if missing:
        raise ModelError(f"model {model} v{reply.header.get('version')} answered without output {missing[0]!r}")
    outputs, raw = render_outputs(reply.tensors, wanted)
    answer = {"model_name": model, "model_version": str(reply.header.get("version")), "id": answer_id,
              "outputs": outputs}  # fmt: skip
    headers = {"X-Request-ID": request_id}
    if not raw:
        return _body(answer, headers=headers)
    head = orjson.dumps(answer)
    headers["Inference-Header-Content-Length"] = str(len(head))
    return Response(head + raw, media_type="application/octet-stream", headers=headers)
