"""The prediction fast path answers exactly as the routed application does (status, body, headers and
metrics labels), and really takes the four prediction routes past FastAPI while leaving the rest to it.

No worker is needed for that: with none, every request ends in one of the error answers, which are
where the two paths could most easily diverge.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app_server import metrics
from app_server.app import create_app, prediction_routes
from app_server.fast_path import PredictFastPath
from shared.settings import AppSettings

BODY = b'{"instances": [{"amount": 1.0}]}'
V2_BODY = b'{"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [0]}]}'
REQUESTS = [
    # (path, body, route template, model label, status)
    ("/predict", BODY, "/predict", "demo", 503),
    ("/predict", b'{"instances": []}', "/predict", "demo", 422),
    ("/v1/models/demo/predict", b"{not json", "/v1/models/{name}/predict", "demo", 422),
    ("/v1/models/nope/predict", BODY, "/v1/models/{name}/predict", "", 404),
    ("/v2/models/demo/infer", V2_BODY, "/v2/models/{name}/infer", "demo", 503),
    ("/v2/models/demo/infer", b"[1]", "/v2/models/{name}/infer", "demo", 400),
    ("/v2/models/nope/versions/1/infer", V2_BODY, "/v2/models/{name}/versions/{version}/infer", "", 404),
]


class Recorder:
    """The application behind the fast path, noting what reaches it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.state
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


@pytest.fixture
async def apps():
    app = create_app(AppSettings(model="demo", worker_urls="tcp://127.0.0.1:9"))  # no worker: nothing answers
    recorder = Recorder(app)
    fast = PredictFastPath(recorder, prediction_routes())  # type: ignore[arg-type]
    yield app, fast, recorder
    await app.state.catalog.pool.close()


def count(route: str, code: int, model: str) -> float:
    return metrics.HTTP_REQUESTS.labels(route, str(code), model)._value.get()


@pytest.mark.parametrize(("path", "body", "route", "model", "status"), REQUESTS)
async def test_fast_and_routed_answers_are_the_same(apps, path, body, route, model, status):
    app, fast, recorder = apps
    answers = []
    for asgi in (app, fast):
        before = count(route, status, model)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as client:
            r = await client.post(path, content=body, headers={"X-Request-ID": "rid-1"})
        assert count(route, status, model) == before + 1, (asgi, route, model)
        answers.append((r.status_code, r.json(), r.headers.get("retry-after"), r.headers.get("x-request-id")))
    assert answers[0] == answers[1]
    assert answers[0][0] == status
    assert recorder.paths == []  # the fast path answered it without the application


async def test_everything_else_goes_through_the_application(apps):
    _, fast, recorder = apps
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fast), base_url="http://t") as client:
        assert (await client.get("/predict")).status_code == 405
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.post("/v1/models/demo/predict/extra", content=BODY)).status_code == 404
    assert recorder.paths == ["/predict", "/healthz", "/v1/models/demo/predict/extra"]
