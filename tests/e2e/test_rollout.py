"""Model rollout from the registry with real workers, a real app server and real load (issue 4)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from procs import free_port, wait_for, wait_ready

from loadtest import openloop
from shared import registry
from shared.features import load_spec
from shared.settings import home_registry_uri

POLL = "0.3"
BODY = json.dumps({"instances": [{"amount": 42.0, "merchant_category": "travel", "channel": "web"}]}).encode()


@pytest.fixture(scope="module")
def v1_dir(demo_registry, tmp_path_factory) -> Path:
    return registry.download(demo_registry.uri, demo_registry.version, tmp_path_factory.mktemp("v1"))


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory) -> Path:
    """The --variant model: another seed and one extra feature (device_risk)."""
    from tandem.demo import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("v2") / "model", "small", seed=11, variant=True, rows=3000, epochs=1)


@pytest.fixture
def reg(tmp_path, v1_dir) -> str:
    """A fresh registry whose demo v1 carries @production."""
    uri = home_registry_uri(tmp_path / "registry")
    (tmp_path / "registry").mkdir()
    assert registry.register(uri, "demo", v1_dir).version == "1"
    return uri


def serving_versions(app_url: str) -> list[str | None]:
    return [w["live"] for w in httpx.get(f"{app_url}/v1/models").json()["models"][0]["workers"]]


def in_background(fn, *args, **kw):
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(fn(*args, **kw)), daemon=True)
    thread.start()
    return thread, result


def load_until_version(url: str, version: str, most_s: float) -> dict:
    """60 req/s until a run has seen ``version`` answer (then one run more), summed over the runs."""
    total: dict = {"sent": 0, "ok": 0, "errors": {}, "versions": {}}
    t0, seen = time.monotonic(), False
    while time.monotonic() - t0 < most_s:
        r = openloop.run(url, BODY, 60, 2.0, timeout_ms=3000)
        total["sent"] += r["sent"]
        total["ok"] += r["ok"]
        for key in ("errors", "versions"):
            for k, v in r[key].items():
                total[key][k] = total[key].get(k, 0) + v
        if seen:
            break
        seen = version in r["versions"]
    return total


def test_promote_under_load_fails_nothing_and_switches_every_worker(stack, reg, v2_dir, tmp_path):
    workers = [stack.worker(reg, "--poll-interval", POLL) for _ in range(2)]
    a = stack.app([w.endpoint for w in workers])
    wait_ready(a)
    wait_for(lambda: serving_versions(a.url) == ["1", "1"], 20, what="both workers on v1")
    thread, load = in_background(openloop.run, f"{a.url}/predict", BODY, 60, 6.0, timeout_ms=2000)
    time.sleep(1.5)
    v2 = registry.register(reg, "demo", v2_dir, alias_if_first=None)
    registry.set_alias(reg, "demo", "production", v2.version)
    thread.join(30)
    assert load["errors"] == {}, load
    assert load["ok"] == load["sent"] > 300
    assert set(load["versions"]) == {"1", "2"}, load["versions"]
    wait_for(lambda: serving_versions(a.url) == ["2", "2"], 10, what="both workers on v2")
    after = openloop.run(f"{a.url}/predict", BODY, 40, 1.0, timeout_ms=2000)
    assert after["errors"] == {} and after["versions"] == {"2": after["ok"]}
    # No row encoded for one version ever reached the other: the worker would have refused it.
    for w in workers:
        assert w.counter("tandem_worker_requests_total", model="demo", outcome="bad_request") == 0
        assert w.counter("tandem_model_swaps_total", model="demo", result="ok") == 2


def test_answers_are_computed_from_rows_encoded_for_the_answering_version(stack, reg, v2_dir):
    w = stack.worker(reg, "--poll-interval", POLL)
    a = stack.app([w.endpoint])
    wait_ready(a)
    v2 = registry.register(reg, "demo", v2_dir, alias_if_first=None)
    registry.set_alias(reg, "demo", "production", v2.version)
    wait_for(lambda: serving_versions(a.url) == ["2"], 15, what="worker on v2")
    instance = {"amount": 250.0, "merchant_category": "gaming", "device_risk": 0.9}
    r = httpx.post(f"{a.url}/predict", json={"instances": [instance]}).json()
    assert r["model_version"] == "2"
    files = registry.model_files(v2_dir)
    spec = load_spec(files["feature_spec"].read_text())
    assert spec.width == load_spec(registry.model_files(v2_dir)["feature_spec"].read_text()).width
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert r["predictions"][0] == pytest.approx(
        float(session.run(None, {"input": spec.encoder.encode([instance])})[0][0, 0]), rel=1e-6
    )
    # The v2-only field is refused by nobody now, and v1's schema no longer applies.
    assert "device_risk" in [
        f["name"] for f in httpx.get(f"{a.url}/v1/models").json()["models"][0]["feature_spec"]["features"]
    ]


def _broken(v1_dir: Path, dest: Path, kind: str) -> Path:
    folder = shutil.copytree(v1_dir, dest)
    files = registry.model_files(folder)
    spec = json.loads(files["feature_spec"].read_text())
    if kind == "corrupt_onnx":
        files["onnx"].write_bytes(b"\x08\x07this is not an onnx model")
    elif kind == "wrong_output_shape":
        width = load_spec(files["feature_spec"].read_text()).width
        axes = helper.make_tensor("axes", TensorProto.INT64, [2], [0, 1])
        node = helper.make_node("ReduceSum", ["input", "axes"], ["probability"], keepdims=1)
        graph = helper.make_graph(
            [node],
            "collapse",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
            [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [1, 1])],
            [axes],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(files["onnx"]))
    elif kind == "input_width":
        spec["features"].append({"name": "extra", "type": "numeric", "default": 0.0})
        files["feature_spec"].write_text(json.dumps(spec))
    elif kind == "outputs_mismatch":
        example = json.loads(files["input_example"].read_text())
        example["predictions"] = [p + 0.25 for p in example["predictions"]]
        files["input_example"].write_text(json.dumps(example))
    return folder


def test_broken_versions_never_serve_and_the_old_one_keeps_answering(stack, reg, v1_dir, tmp_path):
    w = stack.worker(reg, "--poll-interval", POLL)
    a = stack.app([w.endpoint])
    wait_ready(a)
    kinds = ["corrupt_onnx", "wrong_output_shape", "input_width", "outputs_mismatch"]
    for i, kind in enumerate(kinds, start=1):
        bad = registry.register(reg, "demo", _broken(v1_dir, tmp_path / kind, kind), alias_if_first=None)
        registry.set_alias(reg, "demo", "production", bad.version)
        wait_for(
            lambda i=i: w.counter("tandem_model_swaps_total", model="demo", result="failed") >= i,
            15,
            what=f"{kind} refused",
        )
        r = httpx.post(f"{a.url}/predict", content=BODY, headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["model_version"] == "1", (kind, r.text)
    log = w.log()
    for reason in ("ONNX Runtime cannot load", "example rows gave output shape", "input width", "do not match"):
        assert reason in log
    assert w.counter("tandem_model_swaps_total", model="demo", result="ok") == 1
    assert w.counter("tandem_model_info", model="demo", version="1", device="cpu") == 1
    # Retried with back-off, not in a tight loop: a handful of attempts at most in this time.
    assert w.counter("tandem_model_swaps_total", model="demo", result="failed") < len(kinds) + 4


def test_rollback_by_moving_the_alias_back(stack, reg, v2_dir):
    w = stack.worker(reg, "--poll-interval", POLL)
    a = stack.app([w.endpoint])
    wait_ready(a)
    v2 = registry.register(reg, "demo", v2_dir, alias_if_first=None)
    registry.set_alias(reg, "demo", "production", v2.version)
    wait_for(lambda: serving_versions(a.url) == ["2"], 15, what="worker on v2")
    thread, load = in_background(openloop.run, f"{a.url}/predict", BODY, 50, 3.0, timeout_ms=2000)
    time.sleep(1.0)
    registry.set_alias(reg, "demo", "production", "1")
    thread.join(20)
    assert load["errors"] == {} and set(load["versions"]) == {"1", "2"}, load
    wait_for(lambda: serving_versions(a.url) == ["1"], 10, what="back on v1")
    assert httpx.post(f"{a.url}/predict", content=BODY).json()["model_version"] == "1"


def _mlflow_server(backend_uri: str, port: int, log: Path) -> subprocess.Popen:
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**env},
        start_new_session=True,
    )


def test_registry_outage_never_stops_serving_and_recovery_picks_up_a_promotion(stack, reg, v2_dir, tmp_path):
    port = free_port()
    server_uri = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow.log"
    server = _mlflow_server(reg, port, log)
    try:
        wait_for(lambda: httpx.get(f"{server_uri}/health").status_code == 200, 60, 0.5, what="mlflow server")
        w = stack.worker(server_uri, "--poll-interval", POLL, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        a = stack.app([w.endpoint])
        wait_ready(a)
        server.terminate()
        server.wait(10)
        wait_for(lambda: w.counter("tandem_registry_poll_errors_total") >= 2, 30, what="poll errors counted")
        load = openloop.run(f"{a.url}/predict", BODY, 40, 2.0, timeout_ms=2000)
        assert load["errors"] == {} and load["versions"] == {"1": load["ok"]}
        # Promotion made while the registry server is down (straight into its database).
        v2 = registry.register(reg, "demo", v2_dir, alias_if_first=None)
        registry.set_alias(reg, "demo", "production", v2.version)
        server = _mlflow_server(reg, port, log)
        wait_for(lambda: serving_versions(a.url) == ["2"], 60, 0.5, what="v2 picked up after recovery")
    finally:
        server.terminate()
        server.wait(10)
    assert np.isfinite(httpx.post(f"{a.url}/predict", content=BODY).json()["predictions"][0])


@pytest.fixture(scope="module")
def xgb_dir(tmp_path_factory) -> Path:
    """The fraud demo as XGBoost trees in a scikit-learn pipeline, logged with MLflow's own flavour and
    no feature spec: served from its signature, the same raw fields as the network takes."""
    pytest.importorskip("xgboost")
    from tandem.demo import build_trees_dir

    return build_trees_dir(tmp_path_factory.mktemp("xgb") / "model", "xgboost", rows=3000)


def test_promote_from_onnx_to_xgboost_under_load_fails_nothing(stack, reg, xgb_dir):
    """Another format and another input path (a signature, Arrow tables on the wire) for the same model:
    requests the app validated for v1's feature spec finish on v1, the rest are re-validated for v2."""
    w = stack.worker(reg, "--poll-interval", POLL)
    a = stack.app([w.endpoint])
    wait_ready(a)
    v2 = registry.register(reg, "demo", xgb_dir, alias_if_first=None)  # no alias yet: the worker ignores it
    # The load runs until v2 has answered (its first load imports MLflow's sklearn flavour: seconds on a
    # slow machine, more under load), at most 60 s, in back-to-back 2 s runs.
    thread, load = in_background(load_until_version, f"{a.url}/predict", "2", most_s=60.0)
    time.sleep(1.5)
    registry.set_alias(reg, "demo", "production", v2.version)
    thread.join(90)
    assert load["errors"] == {}, load
    assert load["ok"] == load["sent"] > 300
    assert set(load["versions"]) == {"1", "2"}, load["versions"]
    entry = httpx.get(f"{a.url}/v1/models/demo").json()
    assert entry["version"] == "2" and entry["flavour"] == "sklearn" and entry["feature_spec"] is None
    r = httpx.post(f"{a.url}/predict", content=BODY, headers={"content-type": "application/json"})
    assert r.status_code == 200 and 0.0 <= r.json()["predictions"][0] <= 1.0, r.text
    assert w.counter("tandem_worker_requests_total", model="demo", outcome="bad_request") == 0
