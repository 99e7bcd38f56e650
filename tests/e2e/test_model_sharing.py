"""Many models on real workers, end to end: three models on two workers with one promoted under load, a
flood on a heavy model beside a light one on the same worker, ``*`` following the registry, and a memory
budget that fits one of two models. Real processes, a real sqlite registry, real ONNX models."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest
from procs import wait_for, wait_ready

from loadtest import openloop
from shared import registry
from shared.features import load_spec
from shared.settings import home_registry_uri

pytestmark = pytest.mark.slow


def folder_of(uri: str, name: str, cache: Path) -> Path:
    return registry.download(uri, registry.resolve(uri, name), cache)


def example(folder: Path) -> tuple[list[dict], np.ndarray]:
    """The version's example instances and what its ONNX session gives for them, run here directly."""
    files = registry.model_files(folder)
    instances = registry.read_input_example(folder)["instances"]
    x = load_spec(files["feature_spec"].read_text()).encoder.encode(instances)
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    return instances, session.run(None, {"input": x})[0][:, 0]


@pytest.fixture(scope="module")
def big_models(tmp_path_factory, models_registry) -> tuple[str, Path]:
    """Two large demo networks (untrained: only their cost matters) and the small churn model, registered
    once for the module."""
    from tandem.demo import register_demo

    home = tmp_path_factory.mktemp("big")
    uri = home_registry_uri(home)
    for i, name in enumerate(("big1", "big2")):
        register_demo(uri, "large", seed=20 + i, rows=1000, epochs=0, name=name)
    registry.register(uri, "churn", folder_of(models_registry.uri, "churn", home / "src"))
    return uri, home


def test_three_models_on_two_workers_and_a_promotion_under_load_fails_nothing(stack, models_registry, tmp_path):
    from tandem.demo import register_demo

    uri = home_registry_uri(tmp_path / "registry")
    for name in ("demo", "churn"):  # the session's models, version 1 each here too
        registry.register(uri, name, folder_of(models_registry.uri, name, tmp_path / "src"))
    register_demo(uri, "small", seed=5, rows=1000, epochs=0, name="third")
    names = ("demo", "churn", "third")
    workers = [stack.worker(uri, "--models", ",".join(names), "--poll-interval", "0.5") for _ in range(2)]
    a = stack.app([w.endpoint for w in workers], "--models", ",".join(names), model=None)
    wait_ready(a)
    wait_for(lambda: all(len(m["workers"]) == 2 for m in httpx.get(f"{a.url}/v1/models").json()["models"]), 20)
    bodies = {}
    for name in names:
        instances, expected = example(folder_of(uri, name, tmp_path / "dl"))
        bodies[name] = json.dumps({"instances": instances[:1]}).encode()
        r = httpx.post(f"{a.url}/v1/models/{name}/predict", json={"instances": instances})
        assert r.status_code == 200 and r.json()["model"] == name and r.json()["model_version"] == "1"
        np.testing.assert_allclose(r.json()["predictions"], expected, rtol=1e-5)
    # Promote demo to a new version (another feature set) while demo and churn are both under load.
    out: list[dict] = []
    targets = [(f"{a.url}/v1/models/{n}/predict", bodies[n], 60.0) for n in ("demo", "churn")]
    load = threading.Thread(target=lambda: out.extend(openloop.run_many(targets, 5.0, timeout_ms=2000)))
    load.start()
    time.sleep(1.0)
    v2 = register_demo(uri, "small", seed=11, variant=True, rows=1000, epochs=0, alias_if_first=None)
    registry.set_alias(uri, "demo", "production", v2.version)
    load.join(30)
    demo_load, churn_load = out
    assert demo_load["errors"] == {} and churn_load["errors"] == {}, out
    assert demo_load["ok"] == demo_load["sent"] >= 250 and churn_load["ok"] == churn_load["sent"] >= 250
    assert set(demo_load["versions"]) == {"1", "2"}  # the swap happened mid-load...
    assert set(churn_load["versions"]) == {"1"}  # ...and only to demo


def test_a_flood_on_a_heavy_model_leaves_a_light_model_on_the_same_worker_fast(stack, big_models):
    uri, home = big_models
    w = stack.worker(uri, "--models", "big1,churn")
    a = stack.app([w.endpoint], "--models", "big1,churn", model=None)
    wait_ready(a)
    width = httpx.get(f"{a.url}/v2/models/big1").json()["inputs"][0]["shape"][1]
    rng = np.random.default_rng(0)
    heavy = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [64, width], "datatype": "FP32", "data": rng.random(64 * width).tolist()}
            ]
        }
    ).encode()
    light = json.dumps(
        {"instances": registry.read_input_example(folder_of(uri, "churn", home / "dl"))["instances"][:1]}
    )
    heavy_url, light_url = f"{a.url}/v2/models/big1/infer", f"{a.url}/v1/models/churn/predict"
    warm = openloop.run(heavy_url, heavy, 20, 1.0, timeout_ms=2000)  # also teaches the cost model
    assert warm["errors"] == {}, warm
    before = _heavy_batches(w)
    capacity = before[1] / before[0]  # requests/s of 64 rows each: one full batch per request
    alone = openloop.run(light_url, light.encode(), 100.0, 2.0, poisson=True)
    heavy_load, light_load = openloop.run_many(
        [(heavy_url, heavy, 2.5 * capacity), (light_url, light.encode(), 100.0)], 5.0, poisson=True, timeout_ms=1000
    )
    after = _heavy_batches(w)
    per_batch_s = (after[0] - before[0]) / (after[1] - before[1])  # what a heavy batch took during the flood
    why = (light_load, alone, heavy_load, per_batch_s)
    assert light_load["errors"] == {}, why
    # Fair sharing's bound: a light request waits for at most about the one heavy batch running when it
    # arrives, so its p99 is its own (alone) plus about one heavy batch. On this machine in its normal
    # state that is well under 50 ms (heavy batches of 20-27 ms; docs/benchmarks.md); the VM's slow spells
    # slow the light path alone 2-4x, so the bound is checked as such, and 50 ms wherever the heavy batch
    # and the light path leave room for it. One queue for both would put it behind the whole heavy backlog
    # (hundreds of ms).
    assert light_load["p99_ms"] <= alone["p99_ms"] + 1.3 * per_batch_s * 1000 + 10, why
    if alone["p99_ms"] + per_batch_s * 1000 < 30:
        assert light_load["p99_ms"] < 50, why
    assert set(heavy_load["errors"]) <= {"503", "504"}, heavy_load  # the flood is shed, never a timeout
    assert heavy_load["ok"] >= 0.5 * capacity * 5.0, (heavy_load, capacity)  # and the heavy model still works


def _heavy_batches(w) -> tuple[float, float]:
    """Seconds executed and batches run of model big1 so far, from the worker's metrics."""
    text = w.metrics()

    def sample(series: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(series + " ")).rpartition(" ")[2])

    return (
        sample('tandem_inference_duration_seconds_sum{model="big1"}'),
        sample('tandem_inference_duration_seconds_count{model="big1"}'),
    )


def test_every_model_with_the_alias_comes_and_goes_with_the_registry(stack, models_registry, tmp_path):
    uri = home_registry_uri(tmp_path / "registry")
    registry.register(uri, "first", folder_of(models_registry.uri, "demo", tmp_path / "src"))
    w = stack.worker(uri, "--models", "*", "--poll-interval", "0.5")
    a = stack.app([w.endpoint], "--models", "*", model=None)
    wait_ready(a)
    churn_folder = folder_of(models_registry.uri, "churn", tmp_path / "src")
    body = {"instances": registry.read_input_example(churn_folder)["instances"][:1]}
    assert httpx.post(f"{a.url}/v1/models/late/predict", json=body).status_code == 404
    t0 = time.monotonic()
    registry.register(uri, "late", churn_folder)  # registered with @production, while the stack runs
    wait_for(lambda: httpx.post(f"{a.url}/v1/models/late/predict", json=body).status_code == 200, 20)
    served_after = time.monotonic() - t0
    assert served_after < 2 * 0.5 * 1.2 + 3.0, served_after  # two polls, the load, a heartbeat
    registry.client(uri).delete_registered_model_alias("late", "production")
    wait_for(lambda: httpx.post(f"{a.url}/v1/models/late/predict", json=body).status_code == 404, 20)
    wait_for(lambda: 'model="late"' not in w.metrics(), 10, what="late's series removed from the worker")
    first = {"instances": registry.read_input_example(folder_of(uri, "first", tmp_path / "dl"))["instances"][:1]}
    assert httpx.post(f"{a.url}/v1/models/first/predict", json=first).status_code == 200


def test_a_budget_for_one_of_two_models_answers_every_request_within_budget_and_margin(stack, big_models, tmp_path):
    uri, home = big_models
    budget_mb = 80  # one large model measures about 52 MB (up to 83 at a process's first load): two never fit
    small = stack.worker(uri, "--models", "churn")  # the process with a model of next to no size, to compare
    w = stack.worker(uri, "--models", "big1,big2", "--max-resident-mb", str(budget_mb), "--poll-interval", "0.5")
    a = stack.app([w.endpoint], "--models", "big1,big2", model=None)
    wait_ready(a)
    wait_for(lambda: all(m["version"] for m in httpx.get(f"{a.url}/v1/models").json()["models"]), 20)
    bodies = {
        n: {"instances": registry.read_input_example(folder_of(uri, n, home / "dl"))["instances"][:1]}
        for n in ("big1", "big2")
    }
    proc = psutil.Process(w.proc.pid)
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    statuses = []
    try:
        for i in range(10):  # alternate: each request finds its model unloaded for the other one
            name = ("big1", "big2")[i % 2]
            r = httpx.post(f"{a.url}/v1/models/{name}/predict", json=bodies[name], headers={"X-Timeout-Ms": "5000"})
            statuses.append(r.status_code if r.status_code == 200 else (r.status_code, r.json()["error"]["code"]))
    finally:
        stop.set()
        sampler.join(2)
    assert all(s in (200, (503, "model_loading")) for s in statuses), statuses
    assert statuses.count(200) >= 8, statuses

    def loaded() -> int:
        return sum(any(w_["loaded"] for w_ in m["workers"]) for m in httpx.get(f"{a.url}/v1/models").json()["models"])

    wait_for(lambda: loaded() == 1, 5, what="one model in memory, as the heartbeats tell the app")
    assert (
        w.counter("tandem_model_evictions_total", model="big1")
        + w.counter("tandem_model_evictions_total", model="big2")
        >= 8
    )
    # Memory: a worker's own (one with only a tiny model), plus the budget, plus the stated margin: while
    # a load runs, the parsed file and the optimiser's copies take up to about twice the model's files
    # (freed when it ends; measured 100-115 MB for these 48 MB files), plus 40 MB of the runtime's
    # one-time set-up for large models and allocator slack.
    wait_for(lambda: small.counter("tandem_model_info", model="churn", version="1", device="cpu") == 1, 10)
    baseline = psutil.Process(small.proc.pid).memory_info().rss
    file_mb = registry.model_files(folder_of(uri, "big1", home / "dl"))["onnx"].stat().st_size / 2**20
    # Once loads are over, what stays is one model within the budget plus the runtime's set-up: two
    # models resident (about 104 MB) would not fit. The peak adds the load's transient copies; it read
    # 218 MB once in CI against the 217 of a 40 MB margin (allocator arenas of the load and the batch
    # threads), so it is held to 60: still below two resident models plus a load (about 250).
    steady_mb = (proc.memory_info().rss - baseline) / 2**20
    assert steady_mb <= budget_mb + 40, (steady_mb, budget_mb)
    over_mb = (max(peak) - baseline) / 2**20
    assert over_mb <= budget_mb + 2 * file_mb + 60, (over_mb, budget_mb, file_mb)
