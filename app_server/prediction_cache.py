"""Optional prediction cache in Redis (off by default: ``prediction_cache_ttl_s`` = 0).

Keyed per row by model, version and a hash of the *encoded* row: two requests that encode to the same
input for the same version get the same answer, whatever raw fields or stored features produced it.
The version is part of the key and is the version the request was encoded for and answered by, so a
cached answer can never come from another version, and a promotion or rollback needs no invalidation.

The cache is an optimisation and never a reason to fail: a Redis error or timeout counts as a miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app_server import metrics
from app_server.feature_store import KEY_PREFIX, make_client
from shared.settings import AppSettings

logger = logging.getLogger(__name__)


class PredictionCache:
    def __init__(self, client: aioredis.Redis, ttl_s: float, timeout_s: float) -> None:
        self.client = client
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.timeout_s = timeout_s
        self._healthy = True

    @classmethod
    def from_settings(cls, settings: AppSettings) -> PredictionCache | None:
        """The cache the settings ask for, or ``None`` when it is off (no Redis or a zero TTL)."""
        if not settings.redis_url or settings.prediction_cache_ttl_s <= 0:
            return None
        timeout_s = settings.feature_timeout_ms / 1000
        return cls(make_client(settings.redis_url, timeout_s), settings.prediction_cache_ttl_s, timeout_s)

    async def close(self) -> None:
        await self.client.aclose()

    @staticmethod
    def keys(model: str, version: str, x: np.ndarray) -> list[str]:
        """One key per encoded row; dtype and width are hashed too, so no two layouts can collide."""
        rows = np.ascontiguousarray(x)
        salt = f"{rows.dtype.str}:{rows.shape[1] if rows.ndim > 1 else 1}:".encode()
        return [
            f"{KEY_PREFIX}:pred:{model}:{version}:{hashlib.blake2b(salt + row.tobytes(), digest_size=16).hexdigest()}"
            for row in rows
        ]

    async def get(self, keys: list[str], timeout_s: float | None = None) -> list[Any | None]:
        """The cached prediction of each key, ``None`` for a miss (and for every key if Redis fails or
        does not answer within ``timeout_s``, at most the cache's own timeout)."""
        try:
            async with asyncio.timeout(self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)):
                raw = await self.client.mget(keys)
            found = [None if v is None else orjson.loads(v) for v in raw]
        except (RedisError, OSError, TimeoutError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
            # Unreachable, or something not written by put() under a cache key: a miss either way.
            self._failed("read", exc)
            metrics.PREDICTION_CACHE.labels("error").inc(len(keys))
            return [None] * len(keys)
        self._recovered()
        hits = sum(1 for v in raw if v is not None)
        metrics.PREDICTION_CACHE.labels("hit").inc(hits)
        metrics.PREDICTION_CACHE.labels("miss").inc(len(keys) - hits)
        return found

    async def put(self, keys: list[str], predictions: list[Any]) -> None:
        """Store predictions with the TTL, in one pipelined round trip; failures are only logged."""
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.client.pipeline(transaction=False) as pipe:
                    for key, prediction in zip(keys, predictions, strict=True):
                        pipe.set(key, orjson.dumps(prediction), px=self.ttl_ms)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("write", exc)
            return
        self._recovered()

    def _failed(self, what: str, exc: BaseException) -> None:
        # Logged once per outage, not per request: a dead cache must not flood the log.
        if self._healthy:
            logger.warning("prediction cache %s failed (%s); serving without it", what, str(exc) or type(exc).__name__)
        self._healthy = False

    def _recovered(self) -> None:
        if not self._healthy:
            logger.info("prediction cache reachable again")
        self._healthy = True
