"""API keys through the whole ASGI stack: the prediction fast path and the routed application refuse
alike (status, shape, headers, metrics), probes pass, and the OpenAPI document declares the schemes.

No worker: an admitted prediction ends in 503 ``no_workers``, which is how a test tells it got past the
check.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from app_server import metrics
from app_server.api_keys import hash_key
from app_server.app import create_app, prediction_routes
from app_server.fast_path import PredictFastPath
from shared.settings import AppSettings

BODY = b'{"instances": [{"amount": 1.0}]}'
V2_BODY = b'{"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [0]}]}'


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
async def client(tmp_path):
    path = tmp_path / "keys.jsonl"
    lines = [{"name": "open", "hash": hash_key("key-open")}, {"name": "slow", "hash": hash_key("key-slow"), "rps": 1}]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    app = create_app(AppSettings(model="demo", worker_urls="tcp://127.0.0.1:9", api_keys_file=path))
    frozen = time.monotonic()
    app.state.api_keys.clock = lambda: frozen  # no refill while a test runs, however slow the machine
    recorder = Recorder(app)
    fast = PredictFastPath(recorder, prediction_routes())  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fast), base_url="http://t") as c:
        c.recorder = recorder  # type: ignore[attr-defined]
        yield c
    await app.state.catalog.pool.close()


def http_count(route: str, code: int) -> float:
    return metrics.HTTP_REQUESTS.labels(route, str(code), "")._value.get()


@pytest.mark.parametrize(
    ("method", "path", "body", "fast", "v2"),
    [
        ("POST", "/predict", BODY, True, False),
        ("POST", "/v1/models/demo/predict", BODY, True, False),
        ("POST", "/v2/models/demo/infer", V2_BODY, True, True),
        ("POST", "/v2/models/demo/versions/1/infer", V2_BODY, True, True),
        ("GET", "/v1/models", None, False, False),
        ("GET", "/v2/models/demo", None, False, True),
        ("GET", "/openapi.json", None, False, False),
        ("GET", "/nowhere", None, False, False),
    ],
)
async def test_every_route_needs_a_key_on_either_path(client, method, path, body, fast, v2):
    for headers in ({}, {"Authorization": "Bearer key-wrong"}, {"X-API-Key": "key-ope"}):
        r = await client.request(method, path, content=body, headers=headers)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        if v2:
            assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
        else:
            assert r.json()["error"]["code"] == "unauthorized"
    for headers in ({"Authorization": "Bearer key-open"}, {"X-API-Key": "key-open"}):
        r = await client.request(method, path, content=body, headers=headers)
        assert r.status_code != 401, (path, headers, r.text)
    assert client.recorder.paths == ([] if fast else [path] * 5)  # the fast path answered both without it


async def test_probes_and_metrics_need_no_key(client):
    for path in ("/healthz", "/v2/health/live", "/metrics"):
        assert (await client.get(path)).status_code == 200, path
    for path in ("/readyz", "/v2/health/ready"):
        assert (await client.get(path)).status_code == 503, path  # not ready (no worker), but not refused


async def test_a_key_over_its_rate_gets_429_with_retry_after_on_both_paths(client):
    slow, other = {"X-API-Key": "key-slow"}, {"X-API-Key": "key-open"}
    before = http_count("/predict", 429)
    assert (await client.post("/predict", content=BODY, headers=slow)).status_code == 503  # admitted
    r = await client.post("/predict", content=BODY, headers=slow)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "rate_limited"
    r = await client.post("/v2/models/demo/infer", content=V2_BODY, headers=slow)
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "slow" in r.json()["error"]
    r = await client.get("/v1/models", headers=slow)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert (await client.post("/predict", content=BODY, headers=other)).status_code == 503
    assert http_count("/predict", 429) == before + 1  # the fast path counts refusals under their route
    assert metrics.API_KEY_REQUESTS.labels("slow", "rate_limited")._value.get() >= 3


async def test_the_openapi_document_declares_both_schemes(client):
    from openapi_spec_validator import validate

    doc = (await client.get("/openapi.json", headers={"X-API-Key": "key-open"})).json()
    validate(doc)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"}
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    assert doc["security"] == [{"bearer": []}, {"apiKey": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    predict = doc["paths"]["/predict"]["post"]["responses"]
    assert predict["401"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorV1"}
    assert predict["429"]["headers"]["Retry-After"]["required"] is True
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    assert infer["401"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorV2"}


async def test_without_keys_nothing_changes():
    app = create_app(AppSettings(model="demo", worker_urls="tcp://127.0.0.1:9"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        doc = (await c.get("/openapi.json")).json()
        assert "securitySchemes" not in doc.get("components", {}) and "security" not in doc
        assert (await c.get("/v1/models")).status_code == 200
    await app.state.catalog.pool.close()
