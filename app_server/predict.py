"""The /predict path: validate and encode for the version of the worker a request goes to, call it,
retry where that is safe and the budget allows.

Encoding is per version: a request is validated and encoded with the feature spec of the version its
worker serves, and names that version on the wire. If the worker swapped meanwhile it answers
``version_unavailable`` and the request is re-encoded for the new version, invisibly to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson
from pydantic import TypeAdapter, ValidationError

from app_server import metrics
from app_server.prediction_cache import PredictionCache
from app_server.workers import WorkerConn, WorkerLost, WorkerPool
from shared.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelError,
    NoWorkers,
    Overloaded,
    TooLarge,
    from_wire,
)
from shared.features import FeatureSpec, predictions_from
from shared.protocol import Message, Status
from shared.settings import AppSettings

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3

_MESSAGES = {
    "float_type": "expected number",
    "finite_number": "expected a finite number",
    "string_type": "expected string",
    "bool_type": "expected boolean",
    "int_type": "expected integer",
    "extra_forbidden": "unknown field",
    "missing": "required",
    "list_type": "expected a list",
    "model_type": "expected an object",
    "dict_type": "expected an object",
    "too_short": "must not be empty",
}


def format_loc(loc: tuple[Any, ...]) -> str:
    """``instances[3].amount``; a key that is not a plain name is quoted (``instances[0]["a.b"]``) so
    the path stays unambiguous whatever keys a caller sends."""
    path = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "int", "float", "bool") and isinstance(prev, str):
            continue  # after a field name, pydantic names the union member it tried; callers do not care
        elif path and not str(part).isidentifier():
            path += f"[{orjson.dumps(str(part)).decode()}]"
        else:
            path += f".{part}" if path else str(part)
        prev = part
    return path


def validation_error(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> InvalidInput:
    details = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False):
        loc = format_loc(prefix + tuple(err["loc"]))
        if loc in seen:
            continue
        seen.add(loc)
        details.append({"loc": loc, "msg": _MESSAGES.get(err["type"], err["msg"])})
    first = details[0]
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return InvalidInput(f"{first['loc']}: {first['msg']}{more}", details=details)


@dataclass(slots=True)
class Prepared:
    version: str
    x: np.ndarray
    input_name: str
    output_name: str
    cache_keys: list[str] | None = None
    cached: list[Any] | None = None
    """Predictions found in the prediction cache, ``None`` where a row still has to be computed."""
    todo: np.ndarray | None = None
    """Indices of the rows the worker must compute (all of them when ``None``)."""

    @property
    def to_send(self) -> np.ndarray:
        return self.x if self.todo is None else self.x[self.todo]


class VersionSpecs:
    """Feature spec and request validator per (model, version), fetched once from a worker."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._validators: dict[tuple[str, str], tuple[FeatureSpec, TypeAdapter[Any]]] = {}

    async def get(self, conn: WorkerConn, model: str, version: str) -> tuple[FeatureSpec, TypeAdapter[Any]]:
        key = (model, version)
        found = self._validators.get(key)
        if found is None:
            desc = await self.pool.describe(conn, model, version)
            spec = FeatureSpec.model_validate(desc["feature_spec"])
            found = (spec, TypeAdapter(list[spec.instance_model]))  # type: ignore[name-defined]
            self._validators[key] = found
        return found


PrepareFn = Callable[[WorkerConn, str], Awaitable[Prepared]]
"""Gives the tensor to send to a worker for the version it serves (see ``Predictor.infer_prepared``)."""


class FeatureSource(Protocol):
    async def fill(self, spec: FeatureSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows with stored features of their ``entity_id`` filled in where the request left gaps."""


class Predictor:
    def __init__(
        self,
        settings: AppSettings,
        pool: WorkerPool,
        feature_store: FeatureSource | None = None,
        cache: PredictionCache | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.feature_store = feature_store
        self.cache = cache
        self.specs = VersionSpecs(pool)
        self.in_flight = 0
        self._cache_writes: set[asyncio.Future[None]] = set()  # referenced until done, or they may vanish
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)  # read at scrape time, not set per request

    def check_body(self, body: Any) -> list[Any]:
        """Shape checks that need no feature spec: answered before any worker is involved."""
        if not isinstance(body, dict):
            raise InvalidInput('body: expected an object with an "instances" list')
        unknown = set(body) - {"instances"}
        if unknown:
            raise InvalidInput(f"{sorted(unknown)[0]}: unknown field")
        instances = body.get("instances")
        if not isinstance(instances, list):
            raise InvalidInput("instances: " + ("required" if instances is None else "expected a list"))
        if not instances:
            raise InvalidInput("instances: must not be empty")
        if len(instances) > self.settings.max_instances:
            raise TooLarge(f"instances: {len(instances)} instances, at most {self.settings.max_instances} per request")
        return instances

    async def prepare(self, conn: WorkerConn, version: str, instances: list[Any]) -> Prepared:
        spec, validator = await self.specs.get(conn, self.settings.model, version)
        t0 = time.perf_counter()
        try:
            validated = validator.validate_python(instances)
        except ValidationError as exc:
            raise validation_error(exc, ("instances",)) from None
        rows = [inst.__dict__ for inst in validated]
        if self.feature_store is not None and spec.entity:
            rows = await self.feature_store.fill(spec, rows)
        x = spec.encoder.encode(rows)
        metrics.ENCODE_DURATION.observe(time.perf_counter() - t0)
        return Prepared(version, x, spec.input_name, spec.output_name)

    async def cache_writes_done(self) -> None:
        """Wait for the prediction-cache writes still under way (each bounded by the cache's timeout)."""
        if self._cache_writes:
            await asyncio.gather(*self._cache_writes, return_exceptions=True)

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of this app server's in-flight slots; refused at once (503) when all are taken, so a
        flood is shed here instead of queueing in memory. Shared by every inference route."""
        if self.in_flight >= self.settings.max_in_flight:
            raise Overloaded(f"app server holds {self.in_flight} requests already")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def predict(self, instances: list[Any], request_id: str, deadline: float) -> dict[str, Any]:
        with self.admitted():
            return await self._predict(instances, request_id, deadline)

    async def _predict(self, instances: list[Any], request_id: str, deadline: float) -> dict[str, Any]:
        model = self.settings.model
        prepared: dict[str, Prepared] = {}

        async def prepare(conn: WorkerConn, version: str) -> Prepared:
            if version not in prepared:
                prepared[version] = await self.prepare(conn, version, instances)
                await self._look_up_cache(model, prepared[version], deadline)
            return prepared[version]

        reply, p = await self.infer_prepared(model, prepare, request_id, deadline)
        if reply is None:
            return self._from_cache(p, model, request_id)
        return await self._answer(reply, p, model, request_id)

    async def infer_prepared(
        self,
        model: str,
        prepare: PrepareFn,
        request_id: str,
        deadline: float,
        version: str | None = None,
    ) -> tuple[Message | None, Prepared]:
        """Send one request's tensor to a worker, retrying where that is safe and the budget allows.

        The one retry/failover loop of the app server, shared by /predict and the v2 routes so both get
        the same routing, deadlines and retries. ``prepare(conn, version)`` gives the tensor for the
        version the chosen worker serves; it is asked again after a swap, so callers that encode per
        version memoise it. ``version`` pins a version: only workers holding it are picked, and a
        worker that lost it is skipped rather than the request re-targeted. Returns the ``ok`` reply,
        or ``None`` when the prepared tensor has no rows left to send (the prediction cache answered).
        """
        excluded: set[str] = set()
        last_error: Exception | None = None
        for _attempt in range(MAX_ATTEMPTS):
            try:
                conn = self.pool.pick(model, excluded | self._lacking(model, version))
            except NoWorkers:
                if last_error is not None:
                    raise last_error from None
                raise
            target = version or conn.live_versions[model] or ""
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    p = await prepare(conn, target)  # may ask the worker for the version's feature spec
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"deadline passed preparing the request for v{target}") from None
                last_error = NoWorkers(f"{conn.endpoint} did not describe v{target} in time")
                excluded.add(conn.endpoint)
                continue
            except WorkerLost as exc:
                metrics.RETRIES.labels("worker_lost").inc()
                excluded.add(conn.endpoint)
                last_error = NoWorkers(exc.message)
                continue
            if p.todo is not None and p.todo.size == 0:
                return None, p
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("deadline passed before the request reached a worker")
            try:
                reply = await self.pool.infer(conn, model, target, {p.input_name: p.to_send}, remaining, request_id)
            except TimeoutError:
                raise DeadlineExceeded(f"no answer within the deadline (worker {conn.endpoint})") from None
            except WorkerLost as exc:
                metrics.RETRIES.labels("worker_lost").inc()
                logger.warning("request %s: %s; retrying elsewhere", request_id, exc.message)
                excluded.add(conn.endpoint)
                last_error = NoWorkers(exc.message)
                continue
            status = reply.header.get("status")
            if status == Status.OK:
                return reply, p
            if status == Status.VERSION_UNAVAILABLE:
                metrics.RETRIES.labels("version_unavailable").inc()
                if reply.header.get("version"):
                    conn.live_versions[model] = reply.header["version"]
                if version is not None:
                    excluded.add(conn.endpoint)
                last_error = from_wire(status, reply.header.get("message", ""))
                continue
            others = [c for c in self.pool.candidates(model) if c is not conn and c.endpoint not in excluded]
            if status == Status.OVERLOADED and others:
                metrics.RETRIES.labels("overloaded").inc()
                excluded.add(conn.endpoint)
                last_error = from_wire(status, reply.header.get("message", ""))
                continue
            raise from_wire(status or "error", reply.header.get("message", ""))
        assert last_error is not None
        raise last_error

    def _lacking(self, model: str, version: str | None) -> set[str]:
        """Endpoints of workers that do not hold ``version`` (none when no version is pinned)."""
        if version is None:
            return set()
        return {c.endpoint for c in self.pool.conns.values() if version not in c.resident.get(model, [])}

    async def _look_up_cache(self, model: str, p: Prepared, deadline: float) -> None:
        """Mark which rows the cache already answers for this version (one MGET).

        Given at most half the time the request has left: a stalled cache then costs a miss, and the
        request is still computed in time, instead of the cache's own timeout eating the whole budget.
        """
        if self.cache is None:
            return
        p.cache_keys = self.cache.keys(model, p.version, p.x)
        p.cached = await self.cache.get(p.cache_keys, timeout_s=max((deadline - time.monotonic()) / 2, 0.0))
        p.todo = np.fromiter((i for i, v in enumerate(p.cached) if v is None), np.intp)

    def _from_cache(self, p: Prepared, model: str, request_id: str) -> dict[str, Any]:
        return {"predictions": p.cached, "model": model, "model_version": p.version, "request_id": request_id}

    async def _answer(self, reply: Any, p: Prepared, model: str, request_id: str) -> dict[str, Any]:
        out = reply.tensors.get(p.output_name)
        sent = p.to_send.shape[0]
        if out is None or out.shape[0] != sent:
            raise ModelError(
                f"model {model} v{reply.header.get('version')} answered without {sent} rows of {p.output_name!r}"
            )
        predictions = predictions_from(out)
        version = reply.header.get("version")
        if self.cache is not None and p.todo is not None and p.cache_keys is not None:
            # Stored only under the version that computed them: the key names the version the rows were
            # encoded for, and a worker answering for any other version is not cached at all.
            if str(version) != p.version:
                if p.todo.size < len(p.cache_keys):  # would mix two versions in one answer
                    raise ModelError(f"worker answered v{version} for rows encoded for v{p.version}")
                return {"predictions": predictions, "model": model, "model_version": version, "request_id": request_id}
            # Written off the response path: the caller has its answer, a slow cache must not delay it.
            write = asyncio.ensure_future(self.cache.put([p.cache_keys[i] for i in p.todo], predictions))
            self._cache_writes.add(write)
            write.add_done_callback(self._cache_writes.discard)
            merged = list(p.cached or [])
            for i, prediction in zip(p.todo.tolist(), predictions, strict=True):
                merged[i] = prediction
            predictions = merged
        return {"predictions": predictions, "model": model, "model_version": version, "request_id": request_id}
