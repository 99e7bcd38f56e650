"""The Open Inference Protocol (KServe v2 / Triton HTTP) on the app server, for already-encoded tensors.

Standard clients and load tools (``tritonclient``, ``perf_analyzer``, KServe clients) call Tandem
unchanged. Requests go through the same worker pool, batching, deadlines and retries as ``/predict``
(``Predictor.infer_prepared``); only the body format differs. Both the JSON tensor format and the
binary-data extension (``Inference-Header-Content-Length``) are understood, for inputs and outputs.

A tensor is checked against the version's signature here, before any worker is involved: a bad
name, datatype or shape is a 400 that never costs a worker a thing. Errors use the v2 shape
``{"error": "..."}`` with the status codes of DESIGN §3 (400 bad input, 404 unknown model, 503 with
``Retry-After`` when overloaded or no worker serves, 504 past the deadline).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from app_server import metrics
from app_server.predict import Predictor, Prepared
from app_server.routes import MAX_TIMEOUT_MS, budget_s, read_body
from app_server.workers import WorkerConn, WorkerLost
from shared.errors import DeadlineExceeded, InvalidInput, ModelError, ModelNotFound, NoWorkers, TandemError, TooLarge

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v2", tags=["v2"])

HEADER_LENGTH = "inference-header-content-length"
# v2 datatypes of the outputs a worker may return (numpy dtype name -> v2 name).
DATATYPES = {
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "bool": "BOOL",
}
_DECOMPRESS_WBITS = {"gzip": 31, "deflate": 15}

Handler = Callable[..., Awaitable[Response]]


def _body(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def v2_errors(handler: Handler) -> Handler:
    """Render Tandem errors in the v2 shape; validation failures are 400 as the protocol specifies
    (``/predict`` answers them 422, the v1 convention)."""

    @wraps(handler)
    async def wrapper(request: Request, *args: Any, **kwargs: Any) -> Response:
        try:
            return await handler(request, *args, **kwargs)
        except TandemError as exc:
            status = 400 if isinstance(exc, InvalidInput) else exc.http_status
            headers = {}
            if exc.retry_after_s is not None:
                headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
            rid = getattr(request.state, "request_id", None)
            if rid:
                headers["X-Request-ID"] = rid
            log = logger.error if status >= 500 and status not in (503, 504) else logger.warning
            log("%s %s -> %d %s: %s", request.method, request.url.path, status, exc.code, exc.message,
                extra={"request_id": rid})  # fmt: skip
            return _body({"error": exc.message}, status, headers)

    return wrapper


def _predictor(request: Request) -> Predictor:
    return request.app.state.predictor


def _check_model(predictor: Predictor, name: str) -> str:
    model = predictor.settings.model
    if name != model:
        raise ModelNotFound(f"unknown model {name!r}; this server serves {model!r}")
    return model


def _holders(predictor: Predictor, model: str, version: str | None) -> list[WorkerConn]:
    """Live workers serving ``model`` (holding ``version`` when one is given)."""
    conns = predictor.pool.candidates(model)
    return conns if version is None else [c for c in conns if version in c.resident.get(model, [])]


async def _describe(
    predictor: Predictor, model: str, version: str | None, timeout_s: float = 2.0
) -> tuple[str, dict[str, Any]]:
    """The signature of ``version`` (default: the newest live version), from a worker that holds it."""
    conns = _holders(predictor, model, version)
    if not conns:
        if version is not None and predictor.pool.candidates(model):
            raise ModelNotFound(f"model {model!r} has no version {version!r} loaded")
        raise NoWorkers(f"no live worker serves model {model!r}")
    if version is None:
        conn = max(conns, key=lambda c: int(c.live_versions[model] or 0))
        version = conn.live_versions[model] or ""
    else:
        conn = conns[0]
    return version, await predictor.pool.describe(conn, model, version, timeout_s)


def _versions(predictor: Predictor, model: str) -> list[str]:
    held = {v for c in predictor.pool.candidates(model) for v in c.resident.get(model, [])}
    return sorted(held, key=lambda v: (len(v), v))


# -- health and metadata ----------------------------------------------------------------------------


@router.get("/health/live")
async def live() -> Response:
    return _body({"live": True})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    predictor = _predictor(request)
    if predictor.pool.ready(predictor.settings.model):
        return _body({"ready": True})
    return _body({"ready": False}, 503, {"Retry-After": "1"})


@router.get("")
async def server_metadata() -> Response:
    return _body({"name": "tandem", "version": "0.1.0", "extensions": ["binary_tensor_data"]})


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
@v2_errors
async def model_metadata(request: Request, name: str) -> Response:
    version = request.path_params.get("version")
    predictor = _predictor(request)
    model = _check_model(predictor, name)
    _, desc = await _describe(predictor, model, version)
    return _body(
        {
            "name": model,
            "versions": _versions(predictor, model),
            "platform": desc.get("platform", "onnxruntime"),
            "inputs": desc["inputs"],
            "outputs": desc["outputs"],
        }
    )


@router.get("/models/{name}/config")
@router.get("/models/{name}/versions/{version}/config")
@v2_errors
async def model_config(request: Request, name: str) -> Response:
    """Triton's model configuration, the part ``perf_analyzer`` reads (batching on the first dimension)."""
    version = request.path_params.get("version")
    predictor = _predictor(request)
    model = _check_model(predictor, name)
    _, desc = await _describe(predictor, model, version)

    def tensors(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"][1:]} for t in specs]

    return _body(
        {
            "name": model,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": predictor.settings.max_instances,
            "input": tensors(desc["inputs"]),
            "output": tensors(desc["outputs"]),
        }
    )


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
@v2_errors
async def model_ready(request: Request, name: str) -> Response:
    version = request.path_params.get("version")
    predictor = _predictor(request)
    model = _check_model(predictor, name)
    if _holders(predictor, model, version):
        return _body({"name": model, "ready": True})
    return _body({"name": model, "ready": False}, 503, {"Retry-After": "1"})


# -- inference ------------------------------------------------------------------------------------


async def _read_body(request: Request, max_bytes: int) -> bytes:
    body = await read_body(request, max_bytes)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in _DECOMPRESS_WBITS:  # tritonclient's request_compression_algorithm
        inflater = zlib.decompressobj(_DECOMPRESS_WBITS[encoding])
        try:
            body = bytearray(inflater.decompress(body, max_bytes + 1))
        except zlib.error as exc:
            raise InvalidInput(f"body: not valid {encoding} data ({exc})") from None
        if len(body) > max_bytes or inflater.unconsumed_tail:
            raise TooLarge(f"body: more than {max_bytes} bytes once decompressed")
    elif encoding != "identity":
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    return bytes(body)


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header of an inference request and the binary section that follows it (if any)."""
    if header_length is None:
        split = len(body)
    elif header_length.isascii() and header_length.isdigit() and int(header_length) <= len(body):
        split = int(header_length)
    else:
        raise InvalidInput(f"Inference-Header-Content-Length: {header_length!r} is not a length within the body")
    try:
        header = orjson.loads(body[:split])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: invalid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidInput('body: expected an object with an "inputs" list')
    if not isinstance(header.get("parameters") or {}, dict):
        raise InvalidInput("parameters: expected an object")
    return header, body[split:]


def decode_input(header: dict[str, Any], binary: bytes, spec: dict[str, Any], max_rows: int) -> np.ndarray:
    """The one input tensor of a request as float32[n, width], checked against the version's signature."""
    inputs = header["inputs"]
    name = spec["name"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(f"inputs: expected exactly one input tensor, {name!r}; got {len(inputs)}")
    (tensor,) = inputs
    where = f"inputs[0] ({tensor.get('name')!r})"
    if tensor.get("name") != name:
        raise InvalidInput(f"inputs[0].name: unknown input {tensor.get('name')!r}; the model takes {name!r}")
    if tensor.get("datatype") != spec["datatype"]:
        raise InvalidInput(f"{where}: datatype {tensor.get('datatype')!r}, expected {spec['datatype']!r}")
    shape = tensor.get("shape")
    width = spec["shape"][-1]
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d >= 0 for d in shape)):
        raise InvalidInput(f"{where}: shape {shape!r}, expected [n, {width}] (n rows)")
    if shape[1] != width:
        raise InvalidInput(f"{where}: shape {shape}, expected [n, {width}]: each row has {width} values")
    if shape[0] == 0:
        raise InvalidInput(f"{where}: shape {shape}: at least one row is required")
    if shape[0] > max_rows:
        raise TooLarge(f"{where}: {shape[0]} rows, at most {max_rows} per request")
    count = math.prod(shape)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{where}.parameters: expected an object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if size != count * 4 or len(binary) != size:
            raise InvalidInput(
                f"{where}: binary_data_size {size!r} with {len(binary)} bytes after the header; "
                f"shape {shape} of FP32 takes {count * 4}"
            )
        return np.frombuffer(binary, dtype="<f4").astype(np.float32, copy=False).reshape(shape)
    if binary:
        raise InvalidInput(f"body: {len(binary)} bytes of binary data that no input claims (binary_data_size)")
    if "data" not in tensor:
        raise InvalidInput(f"{where}: no data (a JSON 'data' list or the binary_data_size parameter)")
    try:
        arr = np.asarray(tensor["data"])
    except ValueError:  # ragged nesting
        raise InvalidInput(f"{where}: data is not a rectangular list of numbers") from None
    if arr.dtype.kind not in "iuf":
        raise InvalidInput(f"{where}: data must hold only numbers for datatype FP32")
    if arr.size != count:
        raise InvalidInput(f"{where}: data has {arr.size} values, shape {shape} takes {count}")
    with np.errstate(over="ignore"):
        x = arr.astype(np.float32).reshape(shape)
    if not np.isfinite(x).all():  # JSON has no inf or NaN: this is a number float32 cannot hold
        raise InvalidInput(f"{where}: data holds a number beyond float32's range (about 3.4e38)")
    return x


def _deadline(request: Request, header: dict[str, Any], default_ms: float) -> float:
    """``parameters.timeout`` (microseconds, as tritonclient's ``timeout=`` sends it) or ``X-Timeout-Ms``."""
    timeout_us = (header.get("parameters") or {}).get("timeout")
    if timeout_us is None:
        return time.monotonic() + budget_s(request, default_ms)
    if type(timeout_us) not in (int, float) or not 0 < timeout_us <= MAX_TIMEOUT_MS * 1000:
        raise InvalidInput(f"parameters.timeout: expected microseconds in (0, {MAX_TIMEOUT_MS * 1000:.0f}]")
    return time.monotonic() + timeout_us / 1e6


def _requested_outputs(header: dict[str, Any], known: list[str]) -> list[tuple[str, bool]]:
    """(name, binary) per output to return; all outputs when none are named."""
    default_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    wanted = header.get("outputs")
    if wanted is None:
        return [(n, default_binary) for n in known]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise InvalidInput('outputs: expected a list of {"name": ...} objects')
    out = []
    for i, o in enumerate(wanted):
        if o.get("name") not in known:
            raise InvalidInput(f"outputs[{i}].name: unknown output {o.get('name')!r}; the model has {known}")
        parameters = o.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput(f"outputs[{i}].parameters: expected an object")
        out.append((o["name"], bool(parameters.get("binary_data", default_binary))))
    return out


def render_outputs(reply: dict[str, np.ndarray], wanted: list[tuple[str, bool]]) -> tuple[list[dict[str, Any]], bytes]:
    """Output tensors in the v2 format, JSON data or (binary-data extension) raw little-endian bytes."""
    outputs, chunks = [], []
    for name, binary in wanted:
        arr = reply[name]
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPES.get(arr.dtype.name, "BYTES"), "shape": arr.shape}
        if binary:
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    return outputs, b"".join(chunks)


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
@v2_errors
async def infer(request: Request, name: str) -> Response:
    """Run already-encoded rows through the version the chosen worker serves (JSON or binary tensors).

    Headers: ``X-Request-ID`` (echoed; the body's ``id`` or a generated one if absent),
    ``X-Timeout-Ms`` (deadline budget; ``parameters.timeout`` in microseconds takes precedence).
    """
    version = request.path_params.get("version")
    predictor = _predictor(request)
    settings = predictor.settings
    model = _check_model(predictor, name)
    request.state.request_id = request.headers.get("x-request-id")
    header, binary = parse_request(
        await _read_body(request, settings.max_body_bytes), request.headers.get(HEADER_LENGTH)
    )
    req_id = header.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InvalidInput("id: expected a string")
    request_id = request.state.request_id = request.state.request_id or req_id or uuid.uuid4().hex
    deadline = _deadline(request, header, settings.timeout_ms)
    # Checked against the signature of the version it will most likely run on, before any worker
    # is involved; re-checked below should a swap change the signature meanwhile.
    try:  # normally cached; asking a worker for it must not outlast the request's own deadline
        _, desc = await _describe(predictor, model, version, min(2.0, max(deadline - time.monotonic(), 0.001)))
    except WorkerLost:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed waiting for the model's signature") from None
        raise
    t0 = time.perf_counter()
    x = decode_input(header, binary, desc["inputs"][0], settings.max_instances)
    metrics.ENCODE_DURATION.observe(time.perf_counter() - t0)
    wanted = _requested_outputs(header, [o["name"] for o in desc["outputs"]])

    async def prepare(conn: WorkerConn, target: str) -> Prepared:
        sig = (await predictor.pool.describe(conn, model, target))["inputs"][0]
        if sig["name"] != desc["inputs"][0]["name"] or sig["shape"][-1] != x.shape[1]:
            if version is None:
                # Mid-rollout: this worker still (or already) serves a version with another input than
                # the one the tensor was checked against. Not the caller's fault: try another worker.
                raise WorkerLost(f"{conn.endpoint} serves v{target}, whose input differs; trying another worker")
            raise InvalidInput(f"model {model} v{target} now takes {sig['name']!r} of shape {sig['shape']}")
        return Prepared(target, x, sig["name"], wanted[0][0] if wanted else "")

    with predictor.admitted():
        reply, _ = await predictor.infer_prepared(model, prepare, request_id, deadline, version)
    assert reply is not None  # no prediction cache on this path: there is always a tensor to send
    missing = [n for n, _ in wanted if n not in reply.tensors]
    if missing:
        raise ModelError(f"model {model} v{reply.header.get('version')} answered without output {missing[0]!r}")
    outputs, raw = render_outputs(reply.tensors, wanted)
    answer = {"model_name": model, "model_version": str(reply.header.get("version")), "id": req_id or request_id,
              "outputs": outputs}  # fmt: skip
    headers = {"X-Request-ID": request_id}
    if not raw:
        return _body(answer, headers=headers)
    head = orjson.dumps(answer)
    headers["Inference-Header-Content-Length"] = str(len(head))
    return Response(head + raw, media_type="application/octet-stream", headers=headers)
