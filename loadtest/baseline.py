"""The "basic setup" Tandem is measured against: one FastAPI app with the ONNX model in the web process.

This is what most teams start from: a uvicorn process that validates the request, encodes it and calls
``session.run`` inline in an ``async`` handler, so the event loop serves one request at a time. It
speaks the same JSON as Tandem's ``/predict`` and does the same work per request (pydantic validation
generated from the feature spec, :class:`shared.features.Encoder`, orjson), so the comparison measures
the architecture, not a cheaper or dearer code path.

    python -m loadtest.baseline --model-dir DIR --port P [--workers N] [--intra-op-threads T] [--device cuda]

``--workers N`` is uvicorn's own multi-process mode (the ``baseline_per_core`` configuration): N
processes share the listening socket, each with its own copy of the model.
"""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from pydantic import TypeAdapter, ValidationError

from shared.features import load_spec, predictions_from
from shared.registry import model_files

ENV_DIR = "TANDEM_BASELINE_MODEL_DIR"
ENV_THREADS = "TANDEM_BASELINE_INTRA_OP_THREADS"
ENV_NAME = "TANDEM_BASELINE_MODEL_NAME"
ENV_VERSION = "TANDEM_BASELINE_MODEL_VERSION"
ENV_DEVICE = "TANDEM_BASELINE_DEVICE"


def _error(status: int, code: str, message: str) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message, "details": None}})
    return Response(body, status_code=status, media_type="application/json")


def create_app() -> FastAPI:
    """App factory; configured from the environment so uvicorn's worker processes can each build one."""
    import onnxruntime as ort

    files = model_files(Path(os.environ[ENV_DIR]))
    spec = load_spec(files["feature_spec"].read_bytes())
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get(ENV_THREADS, "0"))
    providers = ["CPUExecutionProvider"]
    if os.environ.get(ENV_DEVICE) == "cuda":  # the same setup on a GPU: the session on CUDA, still inline
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(files["onnx"]), options, providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise RuntimeError(f"asked for {providers[0]}, ONNX Runtime gave {session.get_providers()}")
    validator: TypeAdapter[Any] = TypeAdapter(list[spec.instance_model])  # type: ignore[name-defined]
    name = os.environ.get(ENV_NAME, "demo")
    version = os.environ.get(ENV_VERSION, "1")
    app = FastAPI(title="baseline", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
            instances = body["instances"]
            validated = validator.validate_python(instances)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
            return _error(422, "invalid_input", str(exc).splitlines()[0])
        x = spec.encoder.encode([inst.__dict__ for inst in validated])
        # Inline on the event loop: the model call blocks it, one request at a time (the basic setup).
        out = session.run([spec.output_name], {spec.input_name: x})[0]
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        answer = {"predictions": predictions_from(out), "model": name, "model_version": version}
        answer["request_id"] = request_id
        return Response(orjson.dumps(answer), media_type="application/json", headers={"X-Request-ID": request_id})

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m loadtest.baseline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, type=Path, help="a downloaded Tandem model folder")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn processes (one per core: baseline_per_core)")
    ap.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime threads per process; 0 = auto")
    ap.add_argument("--model-name", default="demo")
    ap.add_argument("--model-version", default="1")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the session runs")
    args = ap.parse_args(argv)
    os.environ[ENV_DIR] = str(args.model_dir.resolve())
    os.environ[ENV_THREADS] = str(args.intra_op_threads)
    os.environ[ENV_NAME] = args.model_name
    os.environ[ENV_VERSION] = args.model_version
    os.environ[ENV_DEVICE] = args.device
    uvicorn.run(
        "loadtest.baseline:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
