"""End to end with real processes: uvicorn app server -> ZeroMQ -> worker -> ONNX model from MLflow."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from procs import AppProc, WorkerProc, one_worker_stack, wait_for, wait_ready

from shared import registry
from shared.features import load_spec


@pytest.fixture(scope="module")
def running(demo_registry, tmp_path_factory) -> Iterator[tuple[AppProc, WorkerProc]]:
    """One worker and one app server for the tests that only send requests (each compares counters
    before and after, so they share it): starting a stack per test cost about 4.5 s each."""
    with one_worker_stack(demo_registry.uri, tmp_path_factory.mktemp("predict")) as served:
        yield served


def local_model(demo_registry, tmp_path):
    folder = registry.download(demo_registry.uri, demo_registry.version, tmp_path / "dl")
    files = registry.model_files(folder)
    spec = load_spec(files["feature_spec"].read_text())
    return spec, ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])


def test_readyz_turns_ready_only_when_a_worker_has_a_model(stack, demo_registry):
    from procs import free_port

    late_endpoint = f"tcp://127.0.0.1:{free_port()}"
    a = stack.app([late_endpoint])
    wait_for(lambda: httpx.get(f"{a.url}/healthz").status_code == 200, 30, what="app up")
    r = httpx.get(f"{a.url}/readyz")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_workers"
    assert r.headers["retry-after"]
    p = httpx.post(f"{a.url}/predict", json={"instances": [{"amount": 1.0, "merchant_category": "fuel"}]})
    assert p.status_code == 503 and p.json()["error"]["code"] == "no_workers"
    stack.worker(demo_registry.uri, "--bind", late_endpoint)
    wait_ready(a)


def test_predict_returns_exactly_what_the_onnx_model_gives(running, demo_registry, tmp_path):
    a, _ = running
    spec, session = local_model(demo_registry, tmp_path)
    instances = [
        {"amount": 12.5, "merchant_category": "grocery"},
        {
            "amount": 4999.0,
            "merchant_category": "electronics",
            "channel": "web",
            "country": "NG",
            "is_international": True,
            "card_present": False,
            "hour": 3,
            "tx_count_24h": 14,
        },
        {"amount": 80, "merchant_category": "not-in-vocabulary", "country": "somewhere"},
    ]
    r = httpx.post(f"{a.url}/predict", json={"instances": instances}, headers={"X-Request-ID": "abc-123"})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = session.run(None, {"input": spec.encoder.encode(instances)})[0][:, 0]
    assert body["predictions"] == pytest.approx(expected.tolist(), rel=1e-6)
    assert body["model"] == "demo"
    assert body["model_version"] == demo_registry.version.version
    assert body["request_id"] == "abc-123" == r.headers["x-request-id"]


def test_v1_models_carries_spec_and_a_sendable_example(running, demo_registry):
    a, w = running
    body = httpx.get(f"{a.url}/v1/models").json()
    (m,) = body["models"]
    assert m["name"] == "demo" and m["version"] == demo_registry.version.version
    assert [f["name"] for f in m["feature_spec"]["features"]][:2] == ["amount", "tx_count_24h"]
    assert m["workers"][0]["endpoint"] == w.endpoint
    assert m["workers"][0]["versions"] == [demo_registry.version.version]
    r = httpx.post(f"{a.url}/predict", json={"instances": m["input_example"]})
    assert r.status_code == 200
    assert len(r.json()["predictions"]) == len(m["input_example"])


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"instances": [{"amount": 1.0, "merchant_category": "fuel", "colour": "red"}]}, 422, "instances[0].colour"),
        ({"instances": [{"amount": "12", "merchant_category": "fuel"}]}, 422, "instances[0].amount: expected number"),
        ({"instances": [{"merchant_category": "fuel"}, {"amount": 2.0}]}, 422, "instances[0].amount: required"),
        (
            {"instances": [{"amount": 1.0, "merchant_category": "fuel", "is_international": "yes"}]},
            422,
            "instances[0].is_international: expected boolean",
        ),
        ({"instances": []}, 422, "instances: must not be empty"),
        ({"rows": []}, 422, "rows: unknown field"),
        ({"instances": [{"amount": 1.0, "merchant_category": "fuel", "int": 1}]}, 422, "instances[0].int: "),
        (b"{not json", 422, "body: invalid JSON"),
        ({"instances": [{"amount": 1.0, "merchant_category": "fuel"}] * 257}, 413, "at most 256"),
    ],
)
def test_bad_input_is_rejected_with_a_path_and_never_reaches_a_worker(running, body, status, needle):
    a, w = running
    before = w.counter("tandem_worker_requests_total", model="demo", outcome="ok") + w.counter(
        "tandem_worker_requests_total", outcome="bad_request"
    )
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{a.url}/predict", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    assert err["code"] == ("too_large" if status == 413 else "invalid_input")
    after = w.counter("tandem_worker_requests_total", model="demo", outcome="ok") + w.counter(
        "tandem_worker_requests_total", outcome="bad_request"
    )
    assert after == before


def test_metrics_expose_tandem_series_on_both_tiers(running):
    a, w = running
    assert httpx.post(f"{a.url}/predict", json={"instances": [{"amount": 3.0, "merchant_category": "fuel"}]}).is_success
    app_metrics = httpx.get(f"{a.url}/metrics").text
    for name in (
        "tandem_http_requests_total",
        "tandem_request_duration_seconds",
        "tandem_encode_duration_seconds",
        "tandem_worker_rtt_seconds",
        "tandem_workers_ready",
    ):
        assert name in app_metrics
    assert 'tandem_http_requests_total{code="200",model="demo",route="/predict"}' in app_metrics
    assert w.counter("tandem_worker_requests_total", model="demo", outcome="ok") >= 1
    assert w.counter("tandem_model_info", model="demo", version="1", device="cpu") == 1.0


def test_request_deadline_header_is_validated(running):
    a, _ = running
    body = {"instances": [{"amount": 3.0, "merchant_category": "fuel"}]}
    # A decimal number of milliseconds in (0, 60000], as the OpenAPI document declares: not whatever
    # Python's float() takes ("nan", "1_000").
    for bad in ("soon", "nan", "inf", "1_000", "0x10", "0", "60001", "-5"):
        r = httpx.post(f"{a.url}/predict", json=body, headers={"X-Timeout-Ms": bad})
        assert r.status_code == 422 and "X-Timeout-Ms" in r.json()["error"]["message"], bad
    for good in ("250", "2.5e2", "60000", ".5e3"):
        assert httpx.post(f"{a.url}/predict", json=body, headers={"X-Timeout-Ms": good}).status_code == 200, good


def test_batch_answers_keep_their_order(running, demo_registry, tmp_path):
    a, _ = running
    spec, session = local_model(demo_registry, tmp_path)
    rng = np.random.default_rng(3)
    instances = [{"amount": float(v), "merchant_category": "travel"} for v in rng.lognormal(3, 1.5, 64)]
    r = httpx.post(f"{a.url}/predict", json={"instances": instances})
    expected = session.run(None, {"input": spec.encoder.encode(instances)})[0][:, 0]
    assert r.json()["predictions"] == pytest.approx(expected.tolist(), rel=1e-6)


def test_a_worker_without_a_metrics_port_serves(stack, demo_registry):
    """The metrics/probe HTTP side is optional: a bare worker must still start and serve."""
    from procs import free_port, tandem_argv

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    w = stack.worker(demo_registry.uri)
    bare = w.__class__(
        "bare-worker",
        tandem_argv("worker", "--bind", endpoint, "--registry-uri", demo_registry.uri),
        w.log_path.with_name("bare-worker.log"),
        endpoint=endpoint,
    ).start()
    stack.procs.append(bare)
    a = stack.app([endpoint])
    wait_ready(a)
    r = httpx.post(f"{a.url}/predict", json={"instances": [{"amount": 5.0, "merchant_category": "fuel"}]})
    assert r.status_code == 200, bare.log()[-2000:]


def test_a_client_leaving_mid_body_is_counted_499_not_a_server_error(running):
    import socket
    import time

    a, _ = running
    host, port = a.url.removeprefix("http://").split(":")
    before = {
        code: a.counter("tandem_http_requests_total", route="/predict", model="demo", code=code)
        for code in ("499", "500")
    }
    gone = a.counter("tandem_client_disconnects_total")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"inst")  # fmt: skip
        time.sleep(0.2)
    for _ in range(50):
        if a.counter("tandem_http_requests_total", route="/predict", model="demo", code="499") > before["499"]:
            break
        time.sleep(0.1)
    assert a.counter("tandem_http_requests_total", route="/predict", model="demo", code="499") == before["499"] + 1
    assert a.counter("tandem_http_requests_total", route="/predict", model="demo", code="500") == before["500"]
    assert a.counter("tandem_client_disconnects_total") == gone + 1
