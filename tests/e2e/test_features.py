"""Online features end to end: redis-server, `tandem features load`, worker and app server processes."""

from __future__ import annotations

import csv
import json
import re
import statistics
import subprocess
import sys
import time
import uuid

import httpx
import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import app, tandem_argv, wait_ready, worker

from app_server.feature_store import format_value
from tandem.demo_data import synthesize_fraud as synthesize

FEATURES = [
    "amount",
    "tx_count_24h",
    "account_age_days",
    "hour",
    "merchant_category",
    "channel",
    "country",
    "is_international",
    "card_present",
]
BULK_ROWS = 100_000


@pytest.fixture(scope="module")
def served(demo_registry, redis_server, tmp_path_factory):
    """One worker and one app server reading features from the session's redis-server."""
    logs = tmp_path_factory.mktemp("features-logs")
    w = worker(demo_registry.uri, logs)
    a = app([w.endpoint], logs, "--redis-url", redis_server)
    procs = [w, a]
    try:
        wait_ready(a)
        yield a, w, procs, logs
    finally:
        for p in reversed(procs):
            p.stop(timeout=3)  # a hung shutdown must not eat the file's time budget


@pytest.fixture(scope="module")
def accounts(served, redis_server, tmp_path_factory) -> dict[str, dict]:
    """100k accounts bulk-loaded with the CLI from a CSV; returns a sample of them as inline instances."""
    cols, _ = synthesize(BULK_ROWS, np.random.default_rng(42))
    prefix = uuid.uuid4().hex[:6]
    path = tmp_path_factory.mktemp("features") / "accounts.csv"
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["entity_id", *FEATURES])
        for i in range(BULK_ROWS):
            out.writerow([f"{prefix}-{i}", *(format_value(cols[f][i].item()) for f in FEATURES)])
    t0 = time.perf_counter()
    done = subprocess.run(
        tandem_argv("features", "load", str(path), "--entity", "account", "--redis-url", redis_server, "--no-progress"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    rate = re.search(r"\(([\d,]+) rows/s\)", done.stdout)
    assert rate and f"loaded {BULK_ROWS} rows" in done.stdout, done.stdout
    print(f"\nbulk load: {done.stdout.strip()}; whole command {wall:.2f} s ({BULK_ROWS / wall:,.0f} rows/s)")
    sample = np.random.default_rng(1).choice(BULK_ROWS, 64, replace=False)
    return {f"{prefix}-{i}": {f: cols[f][i].item() for f in FEATURES} for i in sample}


def predict(a, instances: list[dict], client: httpx.Client | None = None) -> httpx.Response:
    return (client or httpx).post(f"{a.url}/predict", json={"instances": instances}, timeout=10)


def predictions(a, instances: list[dict]) -> list[float]:
    r = predict(a, instances)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_entity_only_requests_predict_exactly_like_inline_features(served, accounts):
    a, *_ = served
    ids = list(accounts)
    inline = predictions(a, [accounts[i] for i in ids])
    assert predictions(a, [{"entity_id": i} for i in ids]) == inline
    for k in (0, 7, 63):  # and one at a time
        assert predictions(a, [{"entity_id": ids[k]}]) == [inline[k]]


def test_features_get_prints_the_stored_entity(served, accounts, redis_server):
    some_id, row = next(iter(accounts.items()))
    done = subprocess.run(
        tandem_argv("features", "get", "account", some_id, "--redis-url", redis_server),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {f: format_value(v) for f, v in row.items()}
    missing = subprocess.run(
        tandem_argv("features", "get", "account", "nobody", "--redis-url", redis_server), capture_output=True
    )
    assert missing.returncode == 1


def test_request_fields_override_stored_features(served, accounts):
    a, *_ = served
    some_id, row = next(iter(accounts.items()))
    override = {"amount": 4999.0, "merchant_category": "electronics", "is_international": not row["is_international"]}
    got = predictions(a, [{"entity_id": some_id, **override}])
    assert got == predictions(a, [{**row, **override}])
    assert got != predictions(a, [{"entity_id": some_id}])


def test_unknown_entity_falls_back_to_defaults_or_is_a_422(served):
    a, *_ = served
    given_fields = {"amount": 42.0, "merchant_category": "fuel"}
    assert predictions(a, [{"entity_id": "no-such-account", **given_fields}]) == predictions(a, [given_fields])
    r = predict(a, [{"entity_id": "no-such-account", "merchant_category": "fuel"}])
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_input"
    assert err["message"].startswith("instances[0].amount: required")
    assert "no-such-account" in err["message"]


def test_redis_dies_entity_requests_get_503_inline_ones_200_then_it_recovers(served, redis_factory):
    _, w, procs, logs = served
    server = redis_factory()
    a = app([w.endpoint], logs, "--redis-url", server.url)
    procs.append(a)
    wait_ready(a)
    stored = {"amount": "80.5", "merchant_category": "travel", "country": "BR"}
    import redis

    redis.Redis.from_url(server.url).hset("tandem:account:r1", mapping=stored)
    inline = {"amount": 80.5, "merchant_category": "travel", "country": "BR"}
    expected = predictions(a, [inline])
    assert predictions(a, [{"entity_id": "r1"}]) == expected

    server.kill()
    with httpx.Client() as client:
        for _ in range(5):
            r = predict(a, [{"entity_id": "r1"}], client)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "feature_store_unavailable"
            assert int(r.headers["retry-after"]) >= 1
            assert predict(a, [inline], client).status_code == 200
        mixed = predict(a, [inline, {"entity_id": "r1"}], client)
        assert mixed.status_code == 503  # the request needs the store as a whole

    server.start()  # same port, empty: no persistence
    redis.Redis.from_url(server.url).hset("tandem:account:r1", mapping=stored)
    assert predictions(a, [{"entity_id": "r1"}]) == expected
    metrics = httpx.get(f"{a.url}/metrics").text
    assert re.search(r"^tandem_feature_store_errors_total [1-9]", metrics, re.M)
    assert re.search(r'^tandem_feature_store_lookups_total\{result="hit"\} [1-9]', metrics, re.M)


def test_openapi_and_docs_show_the_models_fields(served):
    """With a feature store, a feature without default is required unless entity_id is given: the
    document says so in words and in the schema (anyOf), and the app server agrees on both sides."""
    a, *_ = served
    doc = httpx.get(f"{a.url}/openapi.json").json()
    instance = doc["components"]["schemas"]["Instance.demo"]
    assert set(FEATURES) | {"entity_id"} <= set(instance["properties"])
    assert instance["additionalProperties"] is False and "required" not in instance
    assert {"type": "number", "minimum": -sys.float_info.max, "maximum": sys.float_info.max} in instance["properties"][
        "amount"
    ]["anyOf"]
    assert "required unless entity_id is given" in instance["properties"]["amount"]["description"]
    assert "grocery" in instance["properties"]["merchant_category"]["description"]
    body = doc["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["instances"]["items"] == {"$ref": "#/components/schemas/Instance.demo"}
    assert body == doc["paths"]["/v1/models/demo/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert predict(a, body["example"]["instances"]).status_code == 200
    check = jsonschema.Draft202012Validator(instance)
    for inst, valid in (({"entity_id": "nobody-stored"}, True), ({"amount": 1.0, "merchant_category": "x"}, True),
                        ({}, False), ({"entity_id": None, "amount": 1.0}, False)):  # fmt: skip
        assert check.is_valid(inst) is valid, inst
        r = predict(a, [inst])
        # An unknown entity is data the schema cannot know: its gap is a 422 that names the entity.
        assert (r.status_code == 200) is (valid and "amount" in inst), r.text
        if r.status_code != 200:
            assert r.status_code == 422 and ("nobody-stored" in r.text) is valid, r.text
    docs = httpx.get(f"{a.url}/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
fields = st.sampled_from([*FEATURES, "entity_id"]) | st.text(max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.dictionaries(st.just("instances"), st.lists(st.dictionaries(fields, json_values), max_size=3)) | json_values
)
def test_fuzzed_bodies_over_http_are_never_a_5xx(served, body):
    a, *_ = served
    r = httpx.post(f"{a.url}/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code in (200, 413, 422), r.text
    if r.status_code == 422:
        assert r.json()["error"]["code"] == "invalid_input"


def test_added_latency_of_a_redis_lookup(served, accounts):
    """Measured, not asserted: p50 of entity-only minus p50 of inline, sequential, interleaved."""
    a, *_ = served
    ids = list(accounts)
    inline_ms, entity_ms = [], []
    with httpx.Client() as client:
        for k in range(300):
            some_id = ids[k % len(ids)]
            for body, out in (([accounts[some_id]], inline_ms), ([{"entity_id": some_id}], entity_ms)):
                t0 = time.perf_counter()
                assert predict(a, body, client).status_code == 200
                out.append((time.perf_counter() - t0) * 1000)
    p50_inline, p50_entity = statistics.median(inline_ms), statistics.median(entity_ms)
    print(
        f"\np50 inline {p50_inline:.3f} ms, entity-only {p50_entity:.3f} ms, "
        f"added by the Redis lookup {p50_entity - p50_inline:.3f} ms"
    )


def test_prediction_cache_answers_repeats_for_the_same_version(served, redis_server):
    _, w, procs, logs = served
    a = app([w.endpoint], logs, "--redis-url", redis_server, env={"TANDEM_PREDICTION_CACHE_TTL_S": "30"})
    procs.append(a)
    wait_ready(a)
    instance = {"amount": float(uuid.uuid4().int % 10_000) + 0.25, "merchant_category": "gaming"}
    first = predict(a, [instance]).json()
    second = predict(a, [instance]).json()
    assert second["predictions"] == first["predictions"]
    assert second["model_version"] == first["model_version"]
    metrics = httpx.get(f"{a.url}/metrics").text
    assert re.search(r'^tandem_prediction_cache_total\{result="hit"\} 1\.0$', metrics, re.M), metrics
    assert re.search(r'^tandem_prediction_cache_total\{result="miss"\} 1\.0$', metrics, re.M)
    assert w.counter("tandem_worker_requests_total", model="demo", outcome="ok") >= 1


def test_load_reads_a_csv_saved_with_a_byte_order_mark(redis_server, tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM; it must not become part of the first column's name."""
    import redis

    eid = f"bom-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "bom.csv"
    path.write_text(f"amount,entity_id\n42.5,{eid}\n", encoding="utf-8-sig")
    done = subprocess.run(
        tandem_argv("features", "load", str(path), "--entity", "account", "--redis-url", redis_server, "--no-progress"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert redis.Redis.from_url(redis_server, decode_responses=True).hgetall(f"tandem:account:{eid}") == {
        "amount": "42.5"
    }
