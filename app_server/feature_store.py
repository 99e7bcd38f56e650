"""Online features from Redis (docs/features.md): fill a request's gaps from the hashes of its entities.

An entity's stored features live in the hash ``tandem:{entity}:{entity_id}``, one field per feature,
values as text. A request is served with one pipelined round trip (an HGETALL per distinct entity)
bounded by ``feature_timeout_ms``, because the feature read sits on every request's critical path: a
slow or dead Redis must cost a known few milliseconds and a clear 503, never a hung request. Requests
that carry no ``entity_id`` never touch Redis, so they keep working while it is down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from app_server import metrics
from shared.errors import FeatureStoreUnavailable, InvalidInput
from shared.features import ENTITY_KEY, FeatureSpec
from shared.logs import redact_url
from shared.settings import AppSettings

logger = logging.getLogger(__name__)

KEY_PREFIX = "tandem"
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


def entity_key(entity: str, entity_id: str | int) -> str:
    """The Redis key of one entity's stored features; the bulk loader writes the same keys."""
    return f"{KEY_PREFIX}:{entity}:{entity_id}"


def parse_value(feature_type: str, text: str) -> Any:
    """A stored text value as the feature's type. Raises ValueError when the text does not fit.

    Numbers are decimal text and must be finite (a NaN would silently poison the encoded row);
    booleans are ``true``/``false``/``1``/``0`` in any case; categories are kept as they are.
    """
    if feature_type == "numeric":
        value = float(text)
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    if feature_type == "boolean":
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("not a boolean (true/false/1/0)")
    return text


def format_value(value: Any) -> str | None:
    """Text for one raw value as it is stored in Redis (``None`` and NaN mean: leave the field out)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return None if math.isnan(value) else repr(value)
    return str(value)


def format_id(value: Any) -> str:
    """An entity id as it appears in keys: ``7`` whether it came as 7, "7" or 7.0 (a pandas integer
    column with a gap is float64), so the loader writes the key a request for 7 reads."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


MAX_CONNECTIONS = 64
"""Connections per app server. Each request makes one pipelined round trip, so a few dozen carry
thousands of requests per second; a burst beyond them waits for a free one (within the timeout)."""


def make_client(url: str, timeout_s: float) -> aioredis.Redis:
    """A client whose every wait is bounded by ``timeout_s``, waiting for a free connection included.

    redis-py's default pool fails at once (``MaxConnectionsError``) when its 100 connections are busy:
    a burst of concurrent requests got 503 from a healthy Redis. A blocking pool queues them instead.
    One immediate retry (no back-off) lets a request survive a pooled connection that Redis closed
    when it restarted; redis-py's default back-off of up to seconds would blow every request budget.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )
    return aioredis.Redis(connection_pool=pool)


class RedisFeatureStore:
    """The :class:`app_server.predict.FeatureSource` backed by Redis hashes."""

    def __init__(self, client: aioredis.Redis, timeout_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: AppSettings) -> RedisFeatureStore:
        assert settings.redis_url, "the feature store needs redis_url"
        timeout_s = settings.feature_timeout_ms / 1000
        logger.info("online features from %s", redact_url(settings.redis_url))
        return cls(make_client(settings.redis_url, timeout_s), timeout_s)

    async def close(self) -> None:
        await self.client.aclose()

    async def fill(self, spec: FeatureSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows with their entity's stored features filled in where the request left a gap.

        Request fields win over stored ones. A row whose entity is unknown keeps its gaps, which the
        encoder fills with defaults; a feature with no default is a 422 that names the entity.
        """
        assert spec.entity, "fill() needs a spec with an entity"
        ids = {format_id(row[ENTITY_KEY]) for row in rows if row.get(ENTITY_KEY) is not None}
        if not ids:
            return rows
        stored = await self._read(spec.entity, sorted(ids))
        filled: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            entity_id = row.get(ENTITY_KEY)
            if entity_id is None:
                filled.append(row)
                continue
            found = stored[format_id(entity_id)]
            out = dict(row)
            for f in spec.features:
                if out.get(f.name) is not None:
                    continue
                text = found.get(f.name)
                if text is not None:
                    out[f.name] = _parse_stored(f.type, text, i, f.name, spec.entity, entity_id)
                elif f.default is None:
                    why = "has no stored value for it" if found else "has no stored features"
                    raise InvalidInput(
                        f"instances[{i}].{f.name}: required (not in the request, {spec.entity} "
                        f"{entity_id!r} {why}, and the feature has no default)",
                        details=[{"loc": f"instances[{i}].{f.name}", "msg": "required"}],
                    )
            filled.append(out)
        return filled

    async def _read(self, entity: str, ids: list[str]) -> dict[str, dict[str, str]]:
        """HGETALL of every id in one pipelined round trip, within the timeout."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.client.pipeline(transaction=False) as pipe:
                    for entity_id in ids:
                        pipe.hgetall(entity_key(entity, entity_id))
                    results = await pipe.execute(raise_on_error=False)
        except UnicodeDecodeError:  # bad data, not an outage: retrying cannot help
            raise InvalidInput(f"feature store: a stored {entity} value is not UTF-8 text") from None
        except (RedisError, OSError, TimeoutError) as exc:
            metrics.FEATURE_STORE_ERRORS.inc()
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise FeatureStoreUnavailable(f"feature store unreachable ({reason})") from None
        finally:
            metrics.FEATURE_STORE_DURATION.observe(time.perf_counter() - t0)
        for entity_id, r in zip(ids, results, strict=True):
            if isinstance(r, ResponseError):  # WRONGTYPE: something other than a hash under the key
                raise InvalidInput(f"feature store: {entity_key(entity, entity_id)} is not a hash of features ({r})")
            if isinstance(r, Exception):
                metrics.FEATURE_STORE_ERRORS.inc()
                raise FeatureStoreUnavailable(f"feature store failed ({type(r).__name__}: {r})")
        hits = sum(1 for r in results if r)
        metrics.FEATURE_STORE_LOOKUPS.labels("hit").inc(hits)
        metrics.FEATURE_STORE_LOOKUPS.labels("miss").inc(len(ids) - hits)
        return dict(zip(ids, results, strict=True))


def _parse_stored(feature_type: str, text: str, row: int, name: str, entity: str, entity_id: Any) -> Any:
    try:
        return parse_value(feature_type, text)
    except ValueError as exc:
        # Bad stored data is reported with the key that holds it: the caller cannot fix it, but it must
        # not be encoded silently as something else.
        raise InvalidInput(
            f"instances[{row}].{name}: stored value {text!r} in {entity_key(entity, entity_id)} is invalid ({exc})",
            details=[{"loc": f"instances[{row}].{name}", "msg": f"invalid stored value: {exc}"}],
        ) from None
