"""Models logged the ordinary MLflow way, served by real processes: every answer equals what MLflow's own
``mlflow.pyfunc.load_model(uri).predict(frame)`` gives on the same rows, bad input is refused at the app
server against the model's signature, and a version that cannot load leaves the old one serving."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from flavour_models import frame, log_and_register, numeric
from procs import AppProc, WorkerProc, app, wait_for, wait_ready, worker

from shared.settings import home_registry_uri

pytest.importorskip("xgboost")
pytest.importorskip("lightgbm")

KINDS = {"skpipe": "sklearn", "skproba": "sklearn_proba", "xgb": "xgboost", "lgbm": "lightgbm", "bands": "pyfunc"}


@dataclass
class Served:
    uri: str
    worker: WorkerProc
    app: AppProc


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("flavours")
    uri = home_registry_uri(home)
    for name, kind in KINDS.items():
        log_and_register(uri, name, kind)
    logs = home / "logs"
    w = worker(uri, logs, "--models", ",".join(KINDS), "--poll-interval", "0.5")
    a = app([w.endpoint], logs, model=None)
    try:
        wait_ready(a)
        wait_for(lambda: all(m["version"] for m in models(a)), 90, what="every model served")
        yield Served(uri, w, a)
    except BaseException:
        for p in (w, a):
            print(f"----- {p.name} log -----\n{p.log()[-4000:]}")
        raise
    finally:
        a.stop()
        w.stop()


def models(a: AppProc) -> list[dict]:
    return httpx.get(f"{a.url}/v1/models", timeout=10).json()["models"]


def rows_for(name: str, n: int = 40) -> pd.DataFrame:
    x, _ = frame(n, seed=7)  # rows the models never saw, unseen channel values included
    x.loc[0, "channel"] = "kiosk"
    return numeric(x) if KINDS[name] in ("xgboost", "lightgbm") else x


def as_json(df: pd.DataFrame) -> list[dict]:
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in df.to_dict("records")]


def mlflow_predict(uri: str, name: str, df: pd.DataFrame):
    import mlflow

    mlflow.set_registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/{name}@production").predict(df)


@pytest.mark.parametrize("name", list(KINDS))
def test_answers_equal_mlflow_predict(served: Served, name: str) -> None:
    df = rows_for(name)
    r = httpx.post(f"{served.app.url}/v1/models/{name}/predict", json={"instances": as_json(df)}, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    want = mlflow_predict(served.uri, name, df)
    if isinstance(want, pd.DataFrame):  # a frame answers one object per row
        assert got == want.to_dict("records")
    elif np.asarray(want).dtype.kind in "iub" or np.asarray(want).dtype.kind in "OU":
        assert got == np.asarray(want).tolist()  # labels: exactly
    else:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=0)


def test_description_names_flavour_signature_and_output_types(served: Served) -> None:
    entry = {m["name"]: m for m in models(served.app)}
    assert entry["skpipe"]["flavour"] == "sklearn" and entry["skpipe"]["feature_spec"] is None
    assert {c["name"]: c["type"] for c in entry["skpipe"]["signature"]} == {
        "amount": "double", "age": "long", "channel": "string", "is_international": "boolean",
    }  # fmt: skip
    assert entry["skpipe"]["outputs"] == [{"name": "predictions", "datatype": "INT64", "shape": [-1]}]
    assert entry["skproba"]["outputs"] == [{"name": "predictions", "datatype": "FP64", "shape": [-1, 2]}]
    assert {o["name"]: o["datatype"] for o in entry["bands"]["outputs"]} == {"score": "FP64", "band": "BYTES"}
    assert entry["skpipe"]["input_example"], "the logged input example is offered to callers"


BAD = [
    ({"age": 30, "channel": "web", "is_international": False}, "instances[0].amount"),  # missing required
    ({"amount": "12", "age": 30, "channel": "web", "is_international": False}, "instances[0].amount"),
    ({"amount": 12.0, "age": 30.5, "channel": "web", "is_international": False}, "instances[0].age"),
    ({"amount": 12.0, "age": 30, "channel": 3, "is_international": False}, "instances[0].channel"),
    ({"amount": 12.0, "age": 30, "channel": "web", "is_international": "no"}, "instances[0].is_international"),
    ({"amount": 12.0, "age": 30, "channel": "web", "is_international": False, "zip": "1"}, "instances[0].zip"),
]


@pytest.mark.parametrize(("instance", "path"), BAD)
def test_bad_input_is_422_with_the_path_and_reaches_no_worker(served: Served, instance: dict, path: str) -> None:
    before = served.worker.counter("tandem_worker_requests_total", model="skpipe", outcome="ok")
    r = httpx.post(f"{served.app.url}/v1/models/skpipe/predict", json={"instances": [instance]}, timeout=10)
    assert r.status_code == 422, r.text
    assert path in r.json()["error"]["message"]
    assert served.worker.counter("tandem_worker_requests_total", model="skpipe", outcome="ok") == before


def test_nan_is_refused(served: Served) -> None:
    body = '{"instances": [{"amount": NaN, "age": 30, "channel": "web", "is_international": false}]}'
    r = httpx.post(f"{served.app.url}/v1/models/skpipe/predict", content=body, timeout=10,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 422, r.text


def test_many_concurrent_requests_are_batched_and_all_equal(served: Served) -> None:
    import concurrent.futures

    df = rows_for("xgb", 64)
    want = np.asarray(mlflow_predict(served.uri, "xgb", df)).tolist()
    rows = as_json(df)

    def one(i: int) -> tuple[int, list]:
        r = httpx.post(f"{served.app.url}/v1/models/xgb/predict", json={"instances": rows[i : i + 1]}, timeout=30)
        assert r.status_code == 200, r.text
        return i, r.json()["predictions"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for i, got in pool.map(one, range(64)):
            assert got == want[i : i + 1]
    batches = served.worker.counter("tandem_batch_size_count", model="xgb")
    assert batches > 0


def test_a_version_that_cannot_load_leaves_the_old_one_serving(served: Served, tmp_path: Path) -> None:
    """A corrupt pickle promoted over a good version: refused at load, counted, the old version answers."""
    from mlflow import MlflowClient

    from shared import registry

    client = MlflowClient(served.uri, served.uri)
    good = registry.resolve_alias(served.uri, "skpipe", "production")
    folder = registry.download(served.uri, good, tmp_path / "copy")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    for f in broken.glob("model.*"):
        f.write_bytes(b"this is not a model")
    failed = served.worker.counter("tandem_model_swaps_total", model="skpipe", result="failed")
    bad = registry.register(served.uri, "skpipe", broken, alias_if_first=None)
    client.set_registered_model_alias("skpipe", "production", bad.version)
    try:
        wait_for(
            lambda: served.worker.counter("tandem_model_swaps_total", model="skpipe", result="failed") > failed,
            30, what="the broken version refused",
        )  # fmt: skip
        r = httpx.post(f"{served.app.url}/v1/models/skpipe/predict", json={"instances": as_json(rows_for("skpipe", 3))})
        assert r.status_code == 200 and r.json()["model_version"] == good.version
        assert served.worker.counter("tandem_model_version_refused", model="skpipe", version=bad.version) == 1

        def refused() -> dict | None:
            entry = next(m for m in models(served.app) if m["name"] == "skpipe")
            return entry["workers"][0]["refused"]

        wait_for(lambda: refused() is not None, 10, what="the refusal in /v1/models")
        assert refused()["version"] == bad.version and "MLflow cannot load" in refused()["error"]
    finally:
        client.set_registered_model_alias("skpipe", "production", good.version)
    wait_for(lambda: refused() is None, 10, what="the refusal cleared once the alias points back")
    assert served.worker.counter("tandem_model_version_refused", model="skpipe", version=bad.version) == 0


def test_v2_columns_answer_as_predict_does(served: Served) -> None:
    """The Open Inference Protocol: one 1-D tensor per column, as tritonclient or MLServer send a frame."""
    df = rows_for("skproba", 5)
    types = {"amount": "FP64", "age": "INT64", "channel": "BYTES", "is_international": "BOOL"}
    body = {
        "inputs": [
            {"name": c, "datatype": t, "shape": [len(df)], "data": [as_json(df)[i][c] for i in range(len(df))]}
            for c, t in types.items()
        ]
    }
    r = httpx.post(f"{served.app.url}/v2/models/skproba/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["datatype"] == "FP64" and out["shape"] == [5, 2]
    want = np.asarray(mlflow_predict(served.uri, "skproba", df))
    np.testing.assert_array_equal(np.asarray(out["data"]).reshape(5, 2), want)
    body["inputs"][2]["datatype"] = "FP64"
    r = httpx.post(f"{served.app.url}/v2/models/skproba/infer", json=body, timeout=30)
    assert r.status_code == 400 and "inputs[2]" in r.json()["error"], r.text
    labels = httpx.post(f"{served.app.url}/v2/models/bands/infer", json={**body, "inputs": [
        {**t, "datatype": types[t["name"]]} for t in body["inputs"]]}, timeout=30).json()  # fmt: skip
    band = next(o for o in labels["outputs"] if o["name"] == "band")
    assert band["datatype"] == "BYTES" and set(band["data"]) <= {"low", "medium", "high"}


def test_openapi_documents_each_signature_models_columns(served: Served) -> None:
    doc = httpx.get(f"{served.app.url}/openapi.json", timeout=30).json()
    body = doc["paths"]["/v1/models/skpipe/predict"]["post"]["requestBody"]["content"]["application/json"]
    ref = body["schema"]["properties"]["instances"]["items"]["$ref"].split("/")[-1]
    instance = doc["components"]["schemas"][ref]
    assert set(instance["required"]) == {"amount", "age", "channel", "is_international"}
    assert instance["additionalProperties"] is False
    assert body["example"]["instances"], "the logged input example documents the body"
