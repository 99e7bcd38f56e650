"""The prediction routes straight to their handlers, past the framework's per-request machinery.

At thousands of requests per second the app server's CPU is the limit, and FastAPI's own layers
(body-size limit, exception telemetry, server-error middleware, routing through every registered
route, dependency solving) cost a measurable share of it. :class:`PredictFastPath` wraps the whole
application: a request that one of the prediction routes matches (``POST /predict``,
``/v1/models/{name}/predict``, ``/v2/models/{name}/infer``, ``/v2/models/{name}/versions/{version}/infer``)
is matched by that very route object, handled by its endpoint, its errors rendered by
:func:`~app_server.error_render.error_response` and counted by :func:`~app_server.http_metrics.observe`,
exactly as the routed application would, after the same API key check
(:meth:`~app_server.api_keys.ApiKeys.check`) the application's middleware makes. Then admission
(:mod:`app_server.admission`) decides, before the body is read, whether the server can take it now; a
refusal is rendered like any other error. Everything else goes through FastAPI, and OpenAPI still
documents the prediction routes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from app_server.admission import Admission
from app_server.api_keys import ApiKeys, refusal
from app_server.error_render import error_response
from app_server.http_metrics import observe
from shared.errors import Overloaded

logger = logging.getLogger(__name__)


class PredictFastPath:
    def __init__(self, app: FastAPI, routes: Sequence[APIRoute]) -> None:
        self.app = app
        self.routes = tuple(routes)
        """The application's own route objects for the prediction endpoints, ``/predict`` first."""
        self.api_keys: ApiKeys | None = getattr(app.state, "api_keys", None)
        self.admission: Admission | None = getattr(app.state, "admission", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                break
        else:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope.update(child)  # endpoint, path_params and route, as the router would set them
        scope["app"] = self.app  # what FastAPI would set: handlers find their services through it
        request = Request(scope, receive)
        if self.api_keys is not None and (refused := self.api_keys.check(scope)) is not None:
            await refusal(scope, refused)(scope, receive, send)
            observe(scope, refused.http_status, t0)
            return
        ticket = None
        try:
            try:
                if self.admission is not None:
                    ticket = self.admission.enter()
                response = await route.endpoint(request, **child["path_params"])
            except Overloaded as exc:  # refusals at the door are counted, not logged: a flood would flood the log
                response = error_response(request, exc, log=ticket is not None)
            except Exception as exc:
                response = error_response(request, exc)
            await response(scope, receive, send)
        finally:
            if ticket is not None:
                self.admission.leave(ticket)  # type: ignore[union-attr]
        observe(scope, response.status_code, t0)
