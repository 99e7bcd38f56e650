"""The OpenAPI document tells the truth about a running stack serving two models: a schema-driven fuzzer
(schemathesis, every check) sends what the document admits and what it refuses, and fails on any answer
the document does not describe.

Real processes: one worker serving ``demo`` and ``churn`` (different fields, entities and tensor
widths), one app server whose default model is ``demo``. Bounded and deterministic for CI: a fixed seed,
``--generation-deterministic``, few examples per operation. What schemathesis is told beyond its
defaults, and why, is in ``schemathesis.toml`` at the repository root, which the CLI reads there.

Run the same thing by hand against any stack: ``schemathesis run http://HOST:PORT/openapi.json
--checks all`` from the repository root.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from procs import AppProc, app, wait_for, wait_ready, worker

pytestmark = pytest.mark.schemathesis

ROOT = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = 8
SEED = 20240531
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def two_models(models_registry, tmp_path_factory) -> Iterator[AppProc]:
    logs = tmp_path_factory.mktemp("openapi-fuzz")
    w = worker(models_registry.uri, logs, "--models", "demo,churn")
    a = app([w.endpoint], logs, "--models", "demo,churn", model="demo")
    try:
        wait_ready(a)
        wait_for(lambda: {"/v1/models/demo/predict", "/v1/models/churn/predict"} <= set(paths(a)), 30,
                 what="both models in the document")  # fmt: skip
        yield a
    except BaseException:
        for p in (w, a):
            print(f"----- {p.name} log -----\n{p.log()[-3000:]}")
        raise
    finally:
        a.stop()
        w.stop()


def paths(a: AppProc) -> dict:
    return httpx.get(f"{a.url}/openapi.json", timeout=10).json()["paths"]


def body_schema(op: dict) -> dict:
    return op["requestBody"]["content"]["application/json"]["schema"]


def test_the_document_is_valid_and_shows_each_models_own_body(two_models):
    from openapi_spec_validator import validate

    doc = httpx.get(f"{two_models.url}/openapi.json").json()
    validate(doc)  # OpenAPI 3.1: path parameters declared, schemas well formed
    schemas, ps = doc["components"]["schemas"], doc["paths"]
    demo, churn = schemas["Instance.demo"], schemas["Instance.churn"]
    assert {"amount", "merchant_category", "entity_id"} <= set(demo["properties"])
    assert {"tenure_months", "contract", "entity_id"} <= set(churn["properties"])
    assert not set(demo["properties"]) & {"tenure_months", "contract"}
    # No --redis-url: a feature without default is required, and entity_id cannot stand in for it.
    assert set(demo["required"]) == {"amount", "merchant_category"} and "anyOf" not in demo
    assert set(churn["required"]) == {"tenure_months", "monthly_charges"}
    for model in ("demo", "churn"):
        ref = {"$ref": f"#/components/schemas/Instance.{model}"}
        assert body_schema(ps[f"/v1/models/{model}/predict"]["post"])["properties"]["instances"]["items"] == ref
        tensor = body_schema(ps[f"/v2/models/{model}/infer"]["post"])["properties"]["inputs"]["items"]
        width = httpx.get(f"{two_models.url}/v2/models/{model}").json()["inputs"][0]["shape"][-1]
        assert tensor["properties"]["shape"]["prefixItems"][1] == {"const": width}
    assert body_schema(ps["/predict"]["post"]) == body_schema(ps["/v1/models/demo/predict"]["post"])
    templated = ps["/v1/models/{name}/predict"]["post"]["parameters"][0]
    assert templated["schema"]["not"] == {"enum": ["churn", "demo"]}
    for path in ("/v2/models/{name}/versions/{version}/infer", "/v2/models/{name}/versions/{version}"):
        op = next(iter(ps[path].values()))
        assert {(p["name"], p["in"], p["required"]) for p in op["parameters"]} >= {
            ("name", "path", True), ("version", "path", True)}  # fmt: skip
    predict = ps["/v1/models/churn/predict"]["post"]["responses"]
    assert set(predict) == {"200", "404", "405", "413", "422", "500", "503", "504"}
    assert predict["503"]["headers"]["Retry-After"]["required"] is True
    assert predict["405"]["headers"]["Allow"]["required"] is True
    assert predict["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorV1"}
    infer = ps["/v2/models/churn/infer"]["post"]["responses"]
    assert infer["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorV2"}
    assert "application/octet-stream" in infer["200"]["content"]


def test_schemathesis_finds_nothing(two_models):
    """Every check schemathesis has, on every operation, in every phase (examples, coverage, fuzzing,
    stateful); any failure, error or warning-free non-zero exit fails the test with its report."""
    argv = [sys.executable, "-m", "schemathesis.cli", "run", f"{two_models.url}/openapi.json",
            "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
            "--generation-deterministic", "--workers", "1", "--no-color",
            "--request-timeout", "10"]  # fmt: skip
    t0 = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    report = done.stdout + done.stderr
    print(f"\nschemathesis ran {elapsed:.1f} s\n{report[-1500:]}")
    assert done.returncode == 0, report[-20000:]
    summary = report[report.rindex("SUMMARY") :]
    # It really ran everything: all operations (the two models' own paths included), all four phases.
    assert "Tested: 23" in summary, summary
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in summary, summary
    assert " passed" in summary and "failure" not in summary and "error" not in summary.lower(), summary
