"""HTTP metrics, the same for the routed application and the prediction fast path: one count and one
duration per request, labelled by route template (never the raw path: ``/v1/models/{name}/predict``,
not ``/v1/models/demo/predict``) and by the model the request was about.

A handler names its model with :func:`label_model` once the name is known to be a model the app
serves; until then, and for routes about no model, the label is ``""`` (see :mod:`app_server.metrics`).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app_server import metrics

_MODEL_KEY = "tandem_model"
UNMATCHED = "unmatched"


def label_model(request: Request, model: str) -> None:
    """Count this request under ``model``: call it only with a model the catalog knows."""
    setattr(request.state, _MODEL_KEY, model)


def observe(scope: Scope, status: int, started: float) -> None:
    """Count one answered request (``started``: its ``time.perf_counter()`` at arrival)."""
    route = getattr(scope.get("route"), "path", None) or UNMATCHED
    state: Any = scope.get("state") or {}
    model = state.get(_MODEL_KEY, "")
    metrics.child(metrics.HTTP_REQUESTS, route, str(status), model).inc()
    metrics.child(metrics.REQUEST_DURATION, route, model).observe(time.perf_counter() - started)


class MetricsMiddleware:
    """Counts and times every routed request (pure ASGI: no per-request task overhead)."""

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
            observe(scope, status, t0)
