"""One app server, two models, two workers (one per model), all real processes: each request is routed by
model name to a worker serving that model and answered by that model, on every route.

The two models collide on purpose: both are version 1, so anything keyed by version alone (feature
specs, describe caches, prediction cache keys) would mix them up. ``other`` has one more feature,
``device_risk``, so its body and its tensor differ from ``demo``'s.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from procs import AppProc, WorkerProc, app, sample, wait_for, wait_ready, worker

from shared import registry
from shared.features import FeatureSpec, load_spec
from shared.settings import home_registry_uri

httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")

DEMO_ROWS = [
    {"amount": 12.5, "merchant_category": "grocery"},
    {"amount": 4999.0, "merchant_category": "electronics", "channel": "web", "country": "NG", "hour": 3},
]
OTHER_ROWS = [{**DEMO_ROWS[0], "device_risk": 0.9}, {**DEMO_ROWS[1], "device_risk": 0.05}]
ROWS = {"demo": DEMO_ROWS, "other": OTHER_ROWS}


@dataclass
class Served:
    uri: str
    workers: dict[str, WorkerProc]
    plain: AppProc
    """Both workers, no default model, no --models."""
    configured: AppProc
    """Both workers, --default-model other, --models demo,other,ghost: ghost is required, nobody serves it."""


@pytest.fixture(scope="module")
def served(demo_registry, tmp_path_factory) -> Iterator[Served]:
    from tandem.demo import register_demo

    home = tmp_path_factory.mktemp("two-models")
    uri = home_registry_uri(home)
    demo = registry.download(demo_registry.uri, demo_registry.version, home / "demo-v1")
    assert registry.register(uri, "demo", demo).version == "1"
    assert register_demo(uri, "small", name="other", variant=True, rows=3000, epochs=1).version == "1"
    logs = home / "logs"
    workers = {name: worker(uri, logs, model=name) for name in ("demo", "other")}
    urls = [w.endpoint for w in workers.values()]
    procs: list = list(workers.values())
    try:
        plain = app(urls, logs, model=None)
        configured = app(urls, logs, "--default-model", "other", "--models", "demo,other,ghost", model=None)
        procs += [plain, configured]
        wait_ready(plain)
        for a in (plain, configured):
            want = {"demo": "1", "other": "1"} | ({"ghost": None} if a is configured else {})
            wait_for(lambda a=a, want=want: versions(a) == want, 30, what="both models served")
        yield Served(uri, workers, plain, configured)
    except BaseException:
        for p in procs:
            print(f"----- {p.name} log -----\n{p.log()[-3000:]}")
        raise
    finally:
        for p in procs:
            p.stop()


def versions(a: AppProc) -> dict[str, str | None]:
    return {m["name"]: m["version"] for m in httpx.get(f"{a.url}/v1/models").json()["models"]}


def worker_requests(w: WorkerProc) -> float:
    """Every inference request the worker has seen, whatever its outcome."""
    return sum(
        float(line.rpartition(" ")[2])
        for line in w.metrics().splitlines()
        if line.startswith("tandem_worker_requests_total{")
    )


def seen_by_workers(s: Served) -> dict[str, float]:
    return {name: worker_requests(w) for name, w in s.workers.items()}


def local_model(s: Served, name: str, tmp_path: Path) -> tuple[FeatureSpec, ort.InferenceSession]:
    ref = registry.resolve(s.uri, name, alias="production")
    assert ref is not None
    files = registry.model_files(registry.download(s.uri, ref, tmp_path / name))
    spec = load_spec(files["feature_spec"].read_text())
    return spec, ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])


def test_v1_models_lists_both_with_their_own_schema_example_and_worker(served):
    body = httpx.get(f"{served.plain.url}/v1/models").json()
    entries = {m["name"]: m for m in body["models"]}
    assert sorted(entries) == ["demo", "other"]
    for name, m in entries.items():
        assert m["version"] == "1"
        features = [f["name"] for f in m["feature_spec"]["features"]]
        assert ("device_risk" in features) is (name == "other")
        assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 35 + (name == "other")]}]
        assert m["outputs"][0]["name"] == "probability" and m["device"] == "cpu"
        assert m["workers"] == [
            {"endpoint": served.workers[name].endpoint, "alive": True, "live": "1", "versions": ["1"], "loaded": True,
             "refused": None}
        ]  # fmt: skip
        r = httpx.post(f"{served.plain.url}/v1/models/{name}/predict", json={"instances": m["input_example"]})
        assert r.status_code == 200 and len(r.json()["predictions"]) == len(m["input_example"]), r.text
        assert httpx.get(f"{served.plain.url}/v1/models/{name}").json() == m


def test_each_model_answers_with_its_own_predictions_on_v1_and_v2(served, tmp_path):
    for name, rows in ROWS.items():
        spec, session = local_model(served, name, tmp_path)
        x = spec.encoder.encode(rows)
        expected = session.run(None, {"input": x})[0][:, 0]
        before = seen_by_workers(served)
        r = httpx.post(f"{served.plain.url}/v1/models/{name}/predict", json={"instances": rows})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["predictions"] == pytest.approx(expected.tolist(), rel=1e-6)
        assert body["model"] == name and body["model_version"] == "1"
        v2 = httpx.post(
            f"{served.plain.url}/v2/models/{name}/infer",
            json={
                "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
            },
        )
        assert v2.status_code == 200, v2.text
        assert v2.json()["model_name"] == name and v2.json()["model_version"] == "1"
        assert v2.json()["outputs"][0]["data"] == pytest.approx(expected.tolist(), rel=1e-6)
        after = seen_by_workers(served)
        assert after[name] == before[name] + 2  # both went to this model's worker ...
        assert all(after[n] == before[n] for n in after if n != name)  # ... and nowhere else


def test_tritonclient_sees_both_models(served):
    client = httpclient.InferenceServerClient(url=served.plain.url.removeprefix("http://"))
    try:
        assert client.is_server_ready()
        for name, rows in ROWS.items():
            assert client.is_model_ready(name) and client.is_model_ready(name, "1")
            meta = client.get_model_metadata(name)
            assert meta["name"] == name and meta["versions"] == ["1"]
            spec = FeatureSpec.model_validate(httpx.get(f"{served.plain.url}/v1/models/{name}").json()["feature_spec"])
            assert meta["inputs"][0]["shape"] == [-1, spec.width]
            x = spec.encoder.encode(rows)
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer(name, [inp], model_version="1")
            expected = httpx.post(f"{served.plain.url}/v1/models/{name}/predict", json={"instances": rows}).json()
            np.testing.assert_array_equal(
                result.as_numpy("probability")[:, 0], np.asarray(expected["predictions"], np.float32)
            )
        assert not client.is_model_ready("nope")
    finally:
        client.close()


def test_predict_serves_the_default_model_and_refuses_to_guess_between_two(served):
    before = seen_by_workers(served)
    r = httpx.post(f"{served.plain.url}/predict", json={"instances": DEMO_ROWS})
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_found"
    assert "/v1/models/{name}/predict" in err["message"] and "--default-model" in err["message"]
    assert seen_by_workers(served) == before
    by_default = httpx.post(f"{served.configured.url}/predict", json={"instances": OTHER_ROWS}).json()
    by_name = httpx.post(f"{served.configured.url}/v1/models/other/predict", json={"instances": OTHER_ROWS}).json()
    assert by_default["model"] == "other" and by_default["predictions"] == by_name["predictions"]


LONG = "m" * 3000
ODD_NAMES = ["nope", "a%20b", "%2E%2E", LONG]
ROUTES = [
    ("POST", "/v1/models/{}/predict", "v1"),
    ("GET", "/v1/models/{}", "v1"),
    ("POST", "/v2/models/{}/infer", "v2"),
    ("POST", "/v2/models/{}/versions/1/infer", "v2"),
    ("GET", "/v2/models/{}", "v2"),
    ("GET", "/v2/models/{}/versions/1", "v2"),
    ("GET", "/v2/models/{}/ready", "v2"),
    ("GET", "/v2/models/{}/config", "v2"),
]


def test_unknown_and_odd_model_names_are_404_everywhere_reach_no_worker_and_make_no_series(served):
    a = served.plain
    before = seen_by_workers(served)
    not_found = a.counter("tandem_http_requests_total", route="/v1/models/{name}/predict", code="404", model="")
    body = {"instances": DEMO_ROWS}
    for name in ODD_NAMES:
        for method, template, shape in ROUTES:
            r = httpx.request(method, a.url + template.format(name), json=body if method == "POST" else None)
            assert r.status_code == 404, (name[:20], template, r.text[:300])
            if shape == "v1":
                assert r.json()["error"]["code"] == "model_not_found"
                message = r.json()["error"]["message"]
            else:
                message = r.json()["error"]
                assert isinstance(message, str)
            assert "unknown model" in message and len(message) < 300, message[:300]
    host, port = a.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request(
        "POST", "/v1/models/../predict", body=b'{"instances": []}', headers={"content-type": "application/json"}
    )
    raw = conn.getresponse()
    assert raw.status == 404 and b"model_not_found" in raw.read()
    conn.close()
    assert seen_by_workers(served) == before
    metrics = httpx.get(f"{a.url}/metrics").text
    assert 'model="nope"' not in metrics and "mmmmmmmm" not in metrics and 'model=".."' not in metrics
    assert 'model="a b"' not in metrics
    after = sample(metrics, "tandem_http_requests_total", route="/v1/models/{name}/predict", code="404", model="")
    assert after == not_found + len(ODD_NAMES) + 1


def test_a_body_for_one_model_sent_to_the_other_is_refused_with_the_field_path(served):
    a = served.plain
    before = seen_by_workers(served)
    r = httpx.post(f"{a.url}/v1/models/demo/predict", json={"instances": OTHER_ROWS})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith("instances[0].device_risk: unknown field")
    width = {m["name"]: m["inputs"][0]["shape"][1] for m in httpx.get(f"{a.url}/v1/models").json()["models"]}
    tensor = {"name": "input", "shape": [1, width["demo"]], "datatype": "FP32", "data": [0.0] * width["demo"]}
    r = httpx.post(f"{a.url}/v2/models/other/infer", json={"inputs": [tensor]})
    assert r.status_code == 400 and f"expected [n, {width['other']}]" in r.json()["error"], r.text
    assert seen_by_workers(served) == before


def test_a_required_model_nobody_serves_is_503_and_keeps_the_app_unready(served):
    a = served.configured
    wait_for(lambda: a.counter("tandem_model_workers", model="other") == 1, 30, what="heartbeats in")
    ready = httpx.get(f"{a.url}/readyz")
    assert ready.status_code == 503 and "ghost" in ready.json()["error"]["message"] and ready.headers["retry-after"]
    assert httpx.get(f"{a.url}/v2/health/ready").status_code == 503
    r = httpx.post(f"{a.url}/v1/models/ghost/predict", json={"instances": DEMO_ROWS})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_workers" and r.headers["retry-after"]
    r = httpx.post(f"{a.url}/v2/models/ghost/infer", json={"inputs": []})
    assert r.status_code == 503 and "ghost" in r.json()["error"] and r.headers["retry-after"]
    ghost = httpx.get(f"{a.url}/v1/models/ghost").json()
    assert ghost["version"] is None and ghost["workers"] == []
    assert [m["name"] for m in httpx.get(f"{a.url}/v1/models").json()["models"]] == ["demo", "ghost", "other"]
    gauges = httpx.get(f"{a.url}/metrics").text
    assert 'tandem_model_workers{model="ghost"} 0.0' in gauges  # present, at 0: an alert can fire on it
    assert 'tandem_model_workers{model="demo"} 1.0' in gauges
    assert httpx.post(f"{a.url}/v1/models/demo/predict", json={"instances": DEMO_ROWS}).status_code == 200
    ready = httpx.get(f"{served.plain.url}/readyz").json()
    assert ready["models"] == {"demo": 1, "other": 1} and ready["workers"] == 2


def test_metrics_count_each_model_under_its_own_name_and_routes_by_template(served):
    a = served.plain
    for name, rows in ROWS.items():
        assert httpx.post(f"{a.url}/v1/models/{name}/predict", json={"instances": rows}).status_code == 200
    metrics = httpx.get(f"{a.url}/metrics").text
    for name in ROWS:
        assert sample(metrics, "tandem_http_requests_total", route="/v1/models/{name}/predict", code="200", model=name)
        assert sample(metrics, "tandem_encode_duration_seconds_count", model=name) >= 1
        assert sample(metrics, "tandem_worker_rtt_seconds_count", model=name) >= 1
        assert sample(metrics, "tandem_model_workers", model=name) == 1
    assert sample(metrics, "tandem_http_requests_total", route="/v1/models", code="200", model="") >= 1
    assert "/v1/models/demo/predict" not in metrics and "/v1/models/other/predict" not in metrics
