"""``serve(settings)``: the FastAPI application (``create_app``), its error mapping, its metrics middleware and
the ``/predict`` fast path in front of it."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app_server import metrics
from app_server.feature_store import RedisFeatureStore
from app_server.predict import Predictor, format_loc
from app_server.prediction_cache import PredictionCache
from app_server.routes import install_openapi, json_response, predict, router
from app_server.v2 import router as v2_router
from app_server.workers import WorkerPool
from shared.errors import TandemError
from shared.runtime import tune_gc
from shared.settings import AppSettings

logger = logging.getLogger(__name__)


class MetricsMiddleware:
    """Counts and times every request by route template (pure ASGI: no per-request task overhead)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            metrics.HTTP_REQUESTS.labels(name, str(status)).inc()
            metrics.REQUEST_DURATION.labels(name).observe(time.perf_counter() - t0)


class PredictFastPath:
    """``POST /predict`` straight to its handler, past the framework's per-request machinery.

    At thousands of requests per second the app server's CPU is the limit, and FastAPI's own layers
    (body-size limit, exception telemetry, server-error middleware, routing through every registered
    route, dependency solving) cost a measurable share of it. This wraps the whole application, so a
    prediction meets none of them; the handler, its error mapping and its metrics are exactly those of
    the routed path, and OpenAPI still documents the route. Everything else goes through FastAPI.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._counted: dict[int, Any] = {}
        self._duration = metrics.REQUEST_DURATION.labels("/predict")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope["app"] = self.app  # what FastAPI would set: handlers find the predictor through it
        request = Request(scope, receive)
        try:
            response = await predict(request)
        except TandemError as exc:
            response = _error_response(request, exc)
        except Exception:
            logger.exception("unhandled error on /predict")
            response = json_response({"error": {"code": "internal_error", "message": "internal error"}}, 500)
        await response(scope, receive, send)
        status = response.status_code
        counter = self._counted.get(status)
        if counter is None:
            counter = self._counted[status] = metrics.HTTP_REQUESTS.labels("/predict", str(status))
        counter.inc()
        self._duration.observe(time.perf_counter() - t0)


def _error_response(request: Request, exc: TandemError) -> Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    rid = getattr(request.state, "request_id", None)
    if rid:
        headers["X-Request-ID"] = rid
    log = logger.warning if exc.http_status < 500 or exc.http_status in (503, 504) else logger.error
    log(
        "%s %s -> %d %s: %s",
        request.method,
        request.url.path,
        exc.http_status,
        exc.code,
        exc.message,
        extra={"request_id": rid},
    )
    return json_response(exc.to_body(), exc.http_status, headers)


def serve(settings: AppSettings) -> PredictFastPath:
    """What uvicorn runs: the application behind the ``/predict`` fast path."""
    return PredictFastPath(create_app(settings))


def create_app(settings: AppSettings, pool: WorkerPool | None = None) -> FastAPI:
    pool = pool or WorkerPool(settings)
    feature_store = RedisFeatureStore.from_settings(settings) if settings.redis_url else None
    cache = PredictionCache.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await pool.start()
        tune_gc()
        try:
            yield
        finally:
            await pool.close()
            await app.state.predictor.cache_writes_done()
            for redis_user in (feature_store, cache):
                if redis_user is not None:
                    await redis_user.close()

    app = FastAPI(
        title="Tandem",
        version="0.1.0",
        lifespan=lifespan,
        description="Model serving: stateless app servers, batching GPU workers.",
    )
    app.state.settings = settings
    app.state.predictor = Predictor(settings, pool, feature_store, cache)
    app.include_router(router)
    app.include_router(v2_router)
    install_openapi(app)
    app.add_middleware(MetricsMiddleware)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(TandemError)
    async def tandem_error(request: Request, exc: TandemError) -> Response:
        return _error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        details = [{"loc": format_loc(tuple(e["loc"])), "msg": e["msg"]} for e in exc.errors()]
        first = details[0] if details else {"loc": "body", "msg": "invalid"}
        return json_response(
            {"error": {"code": "invalid_input", "message": f"{first['loc']}: {first['msg']}", "details": details}}, 422
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return json_response({"error": {"code": code, "message": str(exc.detail)}}, exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return json_response({"error": {"code": "internal_error", "message": "internal error"}}, 500)

    return app
