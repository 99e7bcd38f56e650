"""The Open Inference Protocol (KServe v2) end to end: the real ``tritonclient.http`` against a running
stack (uvicorn app server -> ZeroMQ -> worker -> ONNX model from MLflow), compared with ``/predict``."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
from procs import AppProc, WorkerProc, app, one_worker_stack, wait_for, wait_ready

from shared.features import FeatureSpec, load_spec

httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
from tritonclient.utils import InferenceServerException  # noqa: E402

INSTANCES = [
    {"amount": 12.5, "merchant_category": "grocery"},
    {"amount": 4999.0, "merchant_category": "electronics", "channel": "web", "country": "NG", "hour": 3},
    {"amount": 80, "merchant_category": "not-in-vocabulary", "is_international": True, "tx_count_24h": 14},
]


@pytest.fixture(scope="module")
def served(demo_registry, tmp_path_factory) -> Iterator[tuple[AppProc, WorkerProc]]:
    """One worker and one app server for the whole module (starting a stack per test costs seconds)."""
    with one_worker_stack(demo_registry.uri, tmp_path_factory.mktemp("v2")) as served:
        yield served


@pytest.fixture(scope="module")
def spec(served) -> FeatureSpec:
    a, _ = served
    (m,) = httpx.get(f"{a.url}/v1/models").json()["models"]
    return load_spec(orjson.dumps(m["feature_spec"]))


@pytest.fixture
def client(served) -> Iterator[httpclient.InferenceServerClient]:
    a, _ = served
    c = httpclient.InferenceServerClient(url=a.url.removeprefix("http://"))
    yield c
    c.close()


def worker_requests(w: WorkerProc) -> float:
    """Every inference request the worker has seen, whatever its outcome."""
    total = 0.0
    for line in w.metrics().splitlines():
        if line.startswith("tandem_worker_requests_total{"):
            total += float(line.rpartition(" ")[2])
    return total


def predict(a: AppProc) -> tuple[np.ndarray, str]:
    body = httpx.post(f"{a.url}/predict", json={"instances": INSTANCES}).json()
    return np.asarray(body["predictions"], dtype=np.float32), body["model_version"]


def test_tritonclient_reads_health_and_metadata(client, spec, demo_registry):
    version = demo_registry.version.version
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("demo") and client.is_model_ready("demo", version)
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("demo")
    assert meta["name"] == "demo" and meta["versions"] == [version] and meta["platform"] == "onnxruntime"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, spec.width]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [("probability", "FP32", [-1, 1])]
    assert client.get_model_metadata("demo", version) == meta
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    config = client.get_model_config("demo")
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [spec.width]}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_equals_predict(served, client, spec, binary):
    a, _ = served
    expected, version = predict(a)
    x = spec.encoder.encode(INSTANCES)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = None if binary else [httpclient.InferRequestedOutput("probability", binary_data=False)]
    result = client.infer("demo", [inp], outputs=outputs, request_id="req-7")
    response = result.get_response()
    assert response["model_name"] == "demo" and response["model_version"] == version
    assert response["id"] == "req-7"
    assert ("parameters" in response["outputs"][0]) is binary  # binary_data_size: the extension was used
    probability = result.as_numpy("probability")
    assert probability.dtype == np.float32 and probability.shape == (len(INSTANCES), 1)
    np.testing.assert_array_equal(probability[:, 0], expected)
    pinned = client.infer("demo", [inp], model_version=version, outputs=outputs, request_compression_algorithm="gzip")
    np.testing.assert_array_equal(pinned.as_numpy("probability")[:, 0], expected)
    counted = httpx.get(f"{a.url}/metrics").text
    assert (
        'tandem_http_requests_total{code="200",model="demo",route="/v2/models/{name}/versions/{version}/infer"}'
        in counted
    )


def test_raw_json_flat_and_nested_data_and_request_id(served, spec):
    a, _ = served
    expected, version = predict(a)
    x = spec.encoder.encode(INSTANCES)
    shape = list(x.shape)
    for data in (x.ravel().tolist(), x.tolist()):
        body = {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}]}
        r = httpx.post(f"{a.url}/v2/models/demo/infer", json=body, headers={"X-Request-ID": "trace-1"})
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "trace-1" and r.headers["content-type"] == "application/json"
        (out,) = r.json()["outputs"]
        assert out == {"name": "probability", "datatype": "FP32", "shape": [3, 1], "data": expected.tolist()}
        assert r.json()["model_version"] == version and r.json()["id"] == "trace-1"
    # The body's id names the request when no header does, as long as it can be a header value; one that
    # cannot (a newline, a non-Latin-1 character) is still echoed in the body, never in X-Request-ID.
    body = {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": x.ravel().tolist()}]}
    for body_id, header in (("req-9", "req-9"), ("a\nb", None), ("\u2603", None), (" x", None)):
        r = httpx.post(f"{a.url}/v2/models/demo/infer", json=body | {"id": body_id})
        assert r.status_code == 200 and r.json()["id"] == body_id, r.text
        assert (
            r.headers["x-request-id"] == header if header else re.fullmatch("[0-9a-f]{32}", r.headers["x-request-id"])
        )


def _bad_bodies(width: int) -> list[tuple[dict, str]]:
    def body(**tensor: object) -> dict:
        return {"inputs": [{"name": "input", "shape": [1, width], "datatype": "FP32", "data": [0.0] * width, **tensor}]}

    return [
        (body(datatype="FP64"), "datatype 'FP64', expected 'FP32'"),
        (body(shape=[1, width + 1], data=[0.0] * (width + 1)), f"expected [n, {width}]"),
        (body(shape=[width]), f"expected [n, {width}]"),
        (body(shape=[2, width]), f"data has {width} values, shape [2, {width}] takes {2 * width}"),
        (body(data=["1"] * width), "only numbers"),
        (body(data=[1e39] * width), "beyond float32's range"),
        (body(data=[[0.0], [0.0, 1.0]]), "rectangular"),
        (body(name="x"), "unknown input 'x'"),
        (body(shape=[0, width], data=[]), "at least one row"),
        (body(data=None) | {"inputs": [{"name": "input", "shape": [1, width], "datatype": "FP32"}]}, "no data"),
        ({"inputs": body()["inputs"] * 2}, "exactly one input"),
        ({"instances": []}, '"inputs" list'),
        (body() | {"outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
        (body() | {"parameters": {"timeout": -5}}, "parameters.timeout"),
        (body() | {"parameters": [1]}, "parameters: expected an object"),
        (body() | {"outputs": [{"name": "probability", "parameters": [1]}]}, "outputs[0].parameters: expected"),
        # What the OpenAPI document declares, held to: present means of the declared type, null included.
        (body() | {"parameters": None}, "parameters: expected an object"),
        (body() | {"parameters": {"timeout": None}}, "parameters.timeout"),
        (body() | {"parameters": {"binary_data_output": "yes"}}, "parameters.binary_data_output: expected a boolean"),
        (body() | {"outputs": None}, "outputs: expected a list"),
        (body() | {"outputs": [{"name": "probability", "parameters": {"binary_data": 1}}]}, "binary_data: expected"),
        (body() | {"id": None}, "id: expected a string"),
        (body(data=[True] + [0.0] * (width - 1)), "only numbers"),  # numpy would read true as 1.0
        (body(data=[[[0.0] * width]]), "nested as [1, 1, "),
        (body(shape=[1.5, width]), f"expected [n, {width}]"),
    ]


def test_bad_tensors_are_400_and_never_reach_a_worker(served, spec, client):
    a, w = served
    before = worker_requests(w)
    for payload, message in _bad_bodies(spec.width):
        r = httpx.post(f"{a.url}/v2/models/demo/infer", json=payload)
        assert r.status_code == 400, (payload, r.text)
        assert message in r.json()["error"], (message, r.json())
    r = httpx.post(f"{a.url}/v2/models/demo/infer", content=b"{not json")
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]
    head = (
        b'{"inputs": [{"name": "input", "shape": [1, %d], "datatype": "FP32", "parameters": {"binary_data_size": 3}}]}'
    )
    head %= spec.width
    r = httpx.post(
        f"{a.url}/v2/models/demo/infer",
        content=head + b"abc",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 400 and "binary_data_size 3" in r.json()["error"]
    for length in (b"\xb2", b"-1", b"1e3"):  # "²" passes str.isdigit() but is no length
        r = httpx.post(
            f"{a.url}/v2/models/demo/infer", content=head + b"abc", headers={"Inference-Header-Content-Length": length}
        )
        assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"], (length, r.text)
    inp = httpclient.InferInput("input", [1, spec.width], "FP64")
    inp.set_data_from_numpy(np.zeros((1, spec.width)))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("demo", [inp])
    assert exc.value.status() == "400" and "expected 'FP32'" in exc.value.message()
    assert worker_requests(w) == before


def test_unknown_model_or_version_is_404_and_a_spent_deadline_504(served, client, spec):
    a, _ = served
    for path, named in (("/v2/models/nope", "'nope'"), ("/v2/models/demo/versions/999", "'999'")):
        r = httpx.get(f"{a.url}{path}")
        assert r.status_code == 404 and named in r.json()["error"], r.text
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("nope")
    assert exc.value.status() == "404"
    x = np.zeros((1, spec.width), np.float32)
    body = {"inputs": [{"name": "input", "shape": [1, spec.width], "datatype": "FP32", "data": x.ravel().tolist()}]}
    assert httpx.post(f"{a.url}/v2/models/nope/infer", json=body).status_code == 404
    assert httpx.post(f"{a.url}/v2/models/demo/versions/999/infer", json=body).status_code == 404
    r = httpx.post(f"{a.url}/v2/models/demo/infer", json=body | {"parameters": {"timeout": 1}})
    assert r.status_code == 504 and "deadline" in r.json()["error"]


def test_no_workers_is_503_with_retry_after(tmp_path):
    from procs import free_port

    a = app([f"tcp://127.0.0.1:{free_port()}"], tmp_path)
    try:
        wait_for(lambda: httpx.get(f"{a.url}/v2/health/live").status_code == 200, 30, what="app up")
        r = httpx.get(f"{a.url}/v2/health/ready")
        assert r.status_code == 503 and r.json() == {"ready": False} and r.headers["retry-after"]
        body = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0, 0]}]}
        r = httpx.post(f"{a.url}/v2/models/demo/infer", json=body)
        assert r.status_code == 503 and "no live worker" in r.json()["error"] and r.headers["retry-after"]
    finally:
        a.stop()


def test_unpinned_infer_during_a_rollout_skips_workers_on_a_version_with_another_input(stack, demo_registry, tmp_path):
    """Mid-rollout one worker serves v1 (35 inputs) and another v2 (36): a tensor shaped for the newest
    version must never be refused because it was routed to the older one."""
    from shared import registry
    from shared.settings import home_registry_uri
    from tandem.demo import build_model_dir

    (tmp_path / "reg").mkdir()
    uri = home_registry_uri(tmp_path / "reg")
    v1 = registry.download(demo_registry.uri, demo_registry.version, tmp_path / "dl")
    registry.register(uri, "demo", v1)
    v2 = registry.register(
        uri, "demo", build_model_dir(tmp_path / "v2", seed=11, variant=True, rows=2000, epochs=1), alias_if_first=None
    )
    registry.set_alias(uri, "demo", "candidate", v2.version)
    old = stack.worker(uri)  # follows @production: v1
    new = stack.worker(uri, "--alias", "candidate")  # v2
    a = stack.app([old.endpoint, new.endpoint])
    wait_ready(a)
    wait_for(
        lambda: sorted(w["live"] for w in httpx.get(f"{a.url}/v1/models").json()["models"][0]["workers"]) == ["1", "2"],
        15,
        what="one worker per version",
    )
    width = httpx.get(f"{a.url}/v2/models/demo").json()["inputs"][0]["shape"][1]
    body = {"inputs": [{"name": "input", "shape": [1, width], "datatype": "FP32", "data": [0.0] * width}]}
    answers = [httpx.post(f"{a.url}/v2/models/demo/infer", json=body) for _ in range(12)]
    assert [r.status_code for r in answers] == [200] * 12, answers[0].text
    assert {r.json()["model_version"] for r in answers} == {"2"}
