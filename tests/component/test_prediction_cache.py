"""The prediction cache against a real redis-server, alone and wired into Predictor (fake worker pool)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from app_server.feature_store import make_client
from app_server.predict import Predictor
from app_server.prediction_cache import PredictionCache
from app_server.worker_conn import ModelOnWorker, WorkerConn
from shared.errors import NoWorkers
from shared.features import CategoricalFeature, FeatureSpec, NumericFeature
from shared.protocol import Message
from shared.settings import AppSettings

SPEC = FeatureSpec(
    features=[NumericFeature(name="x"), CategoricalFeature(name="c", vocabulary=["a", "b"], default="a")]
)


def cache_for(url: str, ttl_s: float = 60.0) -> PredictionCache:
    return PredictionCache(make_client(url, 0.2), ttl_s, 0.2)


def test_off_unless_redis_and_a_ttl_are_set():
    assert PredictionCache.from_settings(AppSettings()) is None
    assert PredictionCache.from_settings(AppSettings(redis_url="redis://h:1/0")) is None
    assert PredictionCache.from_settings(AppSettings(redis_url="redis://h:1/0", prediction_cache_ttl_s=5)) is not None


def test_keys_depend_on_model_version_and_row_bytes():
    x = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.5]], dtype=np.float32)
    k1 = PredictionCache.keys("demo", "1", x)
    assert k1[0] == k1[1] != k1[2]
    assert PredictionCache.keys("demo", "2", x)[0] != k1[0]
    assert PredictionCache.keys("other", "1", x)[0] != k1[0]
    assert PredictionCache.keys("demo", "1", x.astype(np.float64))[0] != k1[0]
    assert k1[0].startswith("tandem:pred:demo:1:")


@pytest.mark.asyncio
async def test_round_trip_ttl_and_a_dead_redis_is_a_miss(redis_server):
    cache = cache_for(redis_server, ttl_s=0.3)
    keys = [f"tandem:pred:t:{uuid.uuid4().hex}" for _ in range(3)]
    assert await cache.get(keys) == [None, None, None]
    await cache.put(keys[:2], [0.25, [1, 2]])
    assert await cache.get(keys) == [0.25, [1, 2], None]
    await asyncio.sleep(0.4)
    assert await cache.get(keys) == [None, None, None]
    await cache.close()
    dead = cache_for("redis://127.0.0.1:1/0")
    await dead.put(keys, [1, 2, 3])  # no exception: the cache is never a reason to fail
    assert await dead.get(keys) == [None, None, None]
    await dead.close()


def serving(model: str, version: str) -> WorkerConn:
    """A worker (no socket: the fake pool answers for it) whose heartbeat said it serves ``version``."""
    return WorkerConn("fake", None, alive=True, models={model: ModelOnWorker(live=version, resident=[version])})  # type: ignore[arg-type]


@dataclass
class FakePool:
    """Just enough of WorkerPool: one worker whose 'model' sums each row, tagged by version."""

    conn: WorkerConn
    calls: list[tuple[str, int]] = field(default_factory=list)

    def candidates(self, model: str) -> list[WorkerConn]:
        return [self.conn]

    def knows(self, model: str) -> bool:
        return model in self.conn.models

    def pick(self, model: str, exclude: Any = frozenset()) -> WorkerConn:
        if self.conn.endpoint in exclude:
            raise NoWorkers("none")
        return self.conn

    async def describe(self, conn: WorkerConn, model: str, version: str) -> dict[str, Any]:
        return {"feature_spec": SPEC.model_dump()}

    async def infer(self, conn, model, version, inputs, budget_s, request_id) -> Message:
        x = inputs["input"]
        self.calls.append((version, x.shape[0]))
        out = x.sum(axis=1, keepdims=True) + 1000 * int(version)
        return Message({"status": "ok", "version": version}, {"probability": out})


async def predict(predictor: Predictor, instances: list[dict]) -> dict:
    """One request, then its cache write (made off the response path) settled."""
    out = await predictor.predict(predictor.settings.default or "", instances, "rid", time.monotonic() + 5)
    await predictor.cache_writes_done()
    return out


@pytest.mark.asyncio
async def test_predictor_answers_repeats_from_cache_and_never_across_versions(redis_server):
    model = f"m{uuid.uuid4().hex[:8]}"  # keys of other tests' runs can never match
    pool = FakePool(serving(model, "1"))
    settings = AppSettings(redis_url=redis_server, prediction_cache_ttl_s=60, model=model)
    predictor = Predictor(settings, pool, cache=PredictionCache.from_settings(settings))  # type: ignore[arg-type]
    rows = [{"x": 1.0}, {"x": 2.0, "c": "b"}]
    first = await predict(predictor, rows)
    assert pool.calls == [("1", 2)]
    second = await predict(predictor, rows)
    assert pool.calls == [("1", 2)], "a repeat must not reach the worker"
    assert second["predictions"] == first["predictions"] and second["model_version"] == "1"

    partial = await predict(predictor, [{"x": 3.0}, {"x": 1.0}, {"x": 3.0}])
    assert pool.calls[-1] == ("1", 2), "only the rows the cache lacks are sent"
    assert partial["predictions"][1] == first["predictions"][0]
    assert partial["predictions"][0] == partial["predictions"][2]

    pool.conn.models[model].live = "2"  # the worker swapped to a new version
    after = await predict(predictor, rows)
    assert pool.calls[-1] == ("2", 2), "a new version recomputes everything"
    assert after["model_version"] == "2"
    assert all(a >= 1000 * 2 for a in after["predictions"])
    await predictor.cache.close()  # type: ignore[union-attr]


async def test_a_value_put_did_not_write_is_a_miss_not_an_error(redis_server):
    import redis

    cache = cache_for(redis_server)
    keys = cache.keys("m", "1", np.zeros((3, 2), np.float32))
    raw = redis.Redis.from_url(redis_server)
    raw.set(keys[0], b"\xff")
    raw.set(keys[1], b"not json")
    try:
        assert await cache.get(keys) == [None, None, None]
    finally:
        await cache.close()
        raw.delete(*keys)


@pytest.mark.asyncio
async def test_a_stalled_cache_costs_a_miss_within_the_budget_not_the_request(redis_server):
    import redis

    model = f"m{uuid.uuid4().hex[:8]}"
    pool = FakePool(serving(model, "1"))
    settings = AppSettings(redis_url=redis_server, prediction_cache_ttl_s=60, model=model, feature_timeout_ms=200)
    predictor = Predictor(settings, pool, cache=PredictionCache.from_settings(settings))  # type: ignore[arg-type]
    await predict(predictor, [{"x": 1.0}])  # the pool's connection is open before Redis stalls
    redis.Redis.from_url(redis_server).execute_command("CLIENT", "PAUSE", 400, "ALL")
    try:
        t0 = time.monotonic()
        out = await predictor.predict(model, [{"x": 5.0}], "rid", t0 + 0.08)  # less than the cache's 200 ms
        elapsed = time.monotonic() - t0
        assert out["predictions"] and pool.calls[-1] == ("1", 1)
        assert elapsed < 0.07, elapsed  # the read gave up at half the budget; the write did not wait
    finally:
        await asyncio.sleep(0.45)  # the pause is over
        await predictor.cache.close()  # type: ignore[union-attr]
