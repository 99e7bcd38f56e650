"""``serve(settings)``: the FastAPI application (``create_app``) behind the prediction fast path.

What serves a request, and where to look: routes in :mod:`app_server.v1` and :mod:`app_server.v2`,
which names are models in :mod:`app_server.catalog`, encoding in :mod:`app_server.predict`, sending and
retrying in :mod:`app_server.failover`, the workers in :mod:`app_server.workers`, error answers in
:mod:`app_server.error_render`, HTTP metrics in :mod:`app_server.http_metrics`.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import Response

from app_server import v1, v2
from app_server.admission import Admission
from app_server.api_keys import ApiKeyMiddleware, ApiKeys
from app_server.catalog import ModelCatalog
from app_server.error_render import error_response
from app_server.failover import Dispatcher
from app_server.fast_path import PredictFastPath
from app_server.feature_store import RedisFeatureStore
from app_server.http_metrics import MetricsMiddleware
from app_server.observe import Observer
from app_server.openapi import install_openapi
from app_server.predict import Predictor
from app_server.prediction_cache import PredictionCache
from app_server.workers import WorkerPool
from shared.errors import TandemError
from shared.runtime import tune_gc
from shared.settings import AppSettings

logger = logging.getLogger(__name__)

PREDICTION_ENDPOINTS = (v1.predict, v1.predict_model, v2.infer, v2.infer_version)
"""Served by the fast path; ``/predict`` first, the most frequent."""


def serve(settings: AppSettings) -> PredictFastPath:
    """What uvicorn runs: the application behind the prediction fast path."""
    app = create_app(settings)
    return PredictFastPath(app, prediction_routes())


def prediction_routes() -> list[APIRoute]:
    """The route objects of the prediction endpoints, as the application's routers hold them."""
    routes = [r for r in (*v1.router.routes, *v2.router.routes) if isinstance(r, APIRoute)]
    by_endpoint = {r.endpoint: r for r in routes}
    return [by_endpoint[e] for e in PREDICTION_ENDPOINTS]


def create_app(settings: AppSettings, pool: WorkerPool | None = None) -> FastAPI:
    api_keys = ApiKeys.from_settings(settings)  # a bad key file stops start-up here, before any socket opens
    pool = pool or WorkerPool(settings)
    feature_store = RedisFeatureStore.from_settings(settings) if settings.redis_url else None
    cache = PredictionCache.from_settings(settings)
    dispatcher = Dispatcher(settings, pool)
    admission = Admission.from_settings(settings)  # None with --no-admission
    observer = Observer.from_settings(settings, pool)  # a bad --payload-log stops start-up here

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await pool.start()
        tune_gc()
        key_watch = asyncio.create_task(api_keys.watch()) if api_keys is not None else None
        lag_probe = asyncio.create_task(admission.lag.run()) if admission is not None else None
        if observer is not None:
            observer.start()
        try:
            yield
        finally:
            if lag_probe is not None:
                lag_probe.cancel()
            if observer is not None:  # after the last request: the payload log writes what it holds
                await asyncio.to_thread(observer.close)
            if key_watch is not None:
                key_watch.cancel()
            await app.state.predictor.shadow.close()  # mirrors first: nobody waits for them
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
    app.state.api_keys = api_keys
    app.state.admission = admission
    app.state.catalog = ModelCatalog(settings, pool)
    app.state.dispatcher = dispatcher
    app.state.predictor = Predictor(settings, pool, feature_store, cache, dispatcher)
    app.state.predictor.observer = observer
    app.include_router(v1.router)
    app.include_router(v2.router)
    install_openapi(app)
    if api_keys is not None:
        app.add_middleware(ApiKeyMiddleware, keys=api_keys)  # inside the metrics: refusals are counted too
    app.add_middleware(MetricsMiddleware)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for exc_class in (TandemError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_class, error_response)  # type: ignore[arg-type]
    return app
