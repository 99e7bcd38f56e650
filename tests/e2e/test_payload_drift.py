"""Payload log and drift gauges end to end: a worker serving the demo model (registered with its reference
profile), app servers logging to a real folder and a real redis-server, real HTTP requests."""

from __future__ import annotations

import asyncio
import gzip
import json
import statistics
import time

import httpx
import numpy as np
import pytest
import redis
from procs import app, sample, wait_for, wait_ready, worker

from app_server.payload_sinks import read_records
from tandem.demo_data import synthesize_fraud

pytestmark = pytest.mark.slow

FAST = {"TANDEM_DRIFT_INTERVAL_S": "0.2", "TANDEM_DRIFT_WINDOW": "1000"}
FIELDS = {"time", "request_id", "model", "version", "variant", "instance", "entities_resolved", "prediction",
          "latency_ms"}  # fmt: skip


def instances(n: int, seed: int) -> list[dict]:
    cols, _ = synthesize_fraud(n, np.random.default_rng(seed))
    return [{k: v[i].item() for k, v in cols.items()} for i in range(n)]


async def send_all(url: str, bodies: list[list[dict]], prefix: str, concurrency: int = 16) -> list[int]:
    """POST each body (a list of instances) to /predict as request ``{prefix}{i}``; the status codes."""
    codes: list[int] = []
    queue = list(enumerate(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def run() -> None:
            while queue:
                i, body = queue.pop()
                r = await client.post("/predict", json={"instances": body}, headers={"x-request-id": f"{prefix}{i}"})
                codes.append(r.status_code)

        await asyncio.gather(*(run() for _ in range(concurrency)))
    return codes


def psi_of(a, feature: str | None = None) -> float:
    text = httpx.get(f"{a.url}/metrics", timeout=5).text
    if feature is None:
        return sample(text, "tandem_prediction_drift_psi", model="demo", version="1")
    return sample(text, "tandem_feature_drift_psi", model="demo", version="1", feature=feature)


@pytest.fixture(scope="module")
def demo_worker(demo_registry, tmp_path_factory):
    w = worker(demo_registry.uri, tmp_path_factory.mktemp("observe-logs"))
    yield w
    w.stop(timeout=3)


def test_both_sinks_get_every_record_and_drift_sees_only_the_shifted_feature(demo_worker, redis_server, tmp_path):
    """Everything sampled here, so every record can be accounted for; the 10 % sampling rate itself is
    checked over 5,000 requests in tests/component/test_payload_log.py (5,000 HTTP requests through two
    app servers took 100 s on a shared 2-core machine)."""
    folder = tmp_path / "payload"
    stream = f"payload-{time.monotonic_ns()}"
    sampled = ("--payload-sample", "1")
    a = app([demo_worker.endpoint], tmp_path, *sampled, "--payload-log", folder.as_uri(), env=FAST)
    b = app([demo_worker.endpoint], tmp_path, *sampled, "--payload-log", f"{redis_server}?stream={stream}", env=FAST)
    try:
        wait_ready(a)
        wait_ready(b)
        rows = instances(1000, seed=11)
        batches = [rows[i : i + 50] for i in range(0, 1000, 50)]
        codes = asyncio.run(send_all(a.url, batches, "ref-")) + asyncio.run(send_all(b.url, batches[:4], "ref-"))
        assert codes.count(200) == 24
        # Reference traffic: every PSI under the warning line once a window is full.
        wait_for(lambda: sample(httpx.get(f"{a.url}/metrics").text, "tandem_drift_window_rows", model="demo",
                                version="1") >= 1000, 10, what="a full drift window")  # fmt: skip
        time.sleep(0.5)
        names = list(rows[0])
        assert all(psi_of(a, n) < 0.1 for n in names), {n: psi_of(a, n) for n in names}
        assert psi_of(a) < 0.1
        # The same traffic with amount x100, one window of it (20 requests of 50 instances).
        shifted = [{**r, "amount": r["amount"] * 100} for r in instances(1000, seed=12)]
        assert set(asyncio.run(send_all(a.url, [shifted[i : i + 50] for i in range(0, 1000, 50)], "shift-"))) == {200}
        wait_for(lambda: psi_of(a, "amount") > 0.25, 10, what="amount PSI over 0.25")
        assert all(psi_of(a, n) < 0.1 for n in names if n != "amount"), {n: psi_of(a, n) for n in names}
    finally:
        a.stop()  # a clean stop flushes what the payload log holds
        b.stop()
    logged = list(read_records(folder))
    with gzip.open(next(folder.glob("payload-*.jsonl.gz")), "rt") as fh:
        assert json.loads(fh.readline()).keys() == FIELDS
    from_redis = [json.loads(f[b"record"]) for _, f in redis.Redis.from_url(redis_server).xrange(stream)]
    sent = {json.dumps(r, sort_keys=True) for r in rows}
    for records, n_ref in ((logged, 1000), (from_redis, 200)):
        assert all(r.keys() == FIELDS for r in records)
        assert all(r["model"] == "demo" and r["version"] == "1" and r["variant"] == "production" for r in records)
        assert all(isinstance(r["prediction"], float) and r["latency_ms"] > 0 for r in records)
        ref = [r for r in records if r["request_id"].startswith("ref-")]
        assert len(ref) == n_ref and all(json.dumps(r["instance"], sort_keys=True) in sent for r in ref)
    assert sum(r["request_id"].startswith("shift-") for r in logged) == 1000


def p50_ms(url: str, body: dict, n: int = 150) -> float:
    times = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            assert client.post("/predict", json=body).status_code == 200
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def test_a_dead_redis_costs_log_records_not_requests_and_the_log_resumes(demo_worker, redis_factory, tmp_path):
    server = redis_factory()
    a = app([demo_worker.endpoint], tmp_path, "--payload-sample", "1", "--payload-log", f"{server.url}?stream=p")
    try:
        wait_ready(a)
        body = {"instances": instances(1, seed=3)}
        before = p50_ms(a.url, body)
        server.kill()
        during = p50_ms(a.url, body)  # every request succeeds (asserted inside)
        wait_for(lambda: a.counter("tandem_payload_log_dropped_total", reason="sink_error") > 0, 10, what="drops")
        assert during < before * 1.5 + 2, (before, during)
        server.start()  # the same port
        written = a.counter("tandem_payload_log_written_total")
        p50_ms(a.url, body, n=20)
        wait_for(lambda: a.counter("tandem_payload_log_written_total") >= written + 20, 15, what="the log resuming")
        assert redis.Redis.from_url(server.url).xlen("p") >= 20
    finally:
        a.stop()


def test_an_unwritable_folder_costs_log_records_not_requests_and_the_log_resumes(demo_worker, tmp_path):
    folder = tmp_path / "payload"
    folder.write_text("a file where the log's folder should be")
    a = app([demo_worker.endpoint], tmp_path, "--payload-sample", "1", "--payload-log", folder.as_uri())
    try:
        wait_ready(a)
        body = {"instances": instances(1, seed=4)}
        p50_ms(a.url, body, n=50)
        wait_for(lambda: a.counter("tandem_payload_log_dropped_total", reason="sink_error") > 0, 10, what="drops")
        folder.unlink()  # the folder can be made now
        p50_ms(a.url, body, n=20)
        wait_for(lambda: len(list(read_records(folder))) >= 20, 15, what="records in the folder")
    finally:
        a.stop()


def test_a_profile_that_does_not_fit_turns_drift_off_for_that_version_and_serving_goes_on(demo_registry, tmp_path):
    """demo's files registered again with a profile of other features (a mismatch a hand edit makes)."""
    import shutil

    from shared import registry
    from shared.settings import home_registry_uri

    folder = shutil.copytree(registry.download(demo_registry.uri, demo_registry.version, tmp_path / "dl"),
                             tmp_path / "model")  # fmt: skip
    path = registry.model_files(folder)["reference_profile"]
    profile = json.loads(path.read_text())
    profile["features"] = [f for f in profile["features"] if f["name"] != "amount"]
    path.write_text(json.dumps(profile))
    uri = home_registry_uri(tmp_path / "registry")
    registry.register(uri, "mismatch", folder)
    w = worker(uri, tmp_path, model="mismatch")
    a = app([w.endpoint], tmp_path, model="mismatch", env=FAST)
    try:
        wait_ready(a)
        assert set(asyncio.run(send_all(a.url, [instances(50, seed=6)] * 12, "m-"))) == {200}
        wait_for(lambda: "does not fit it" in a.log(), 10, what="the warning")
        assert "absent: ['amount']" in a.log()
        assert "tandem_feature_drift_psi{" not in httpx.get(f"{a.url}/metrics").text
    finally:
        a.stop()
        w.stop()
