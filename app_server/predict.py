"""The /predict path: validate and encode for the version of the worker a request goes to, and answer
from the prediction cache or the worker (the sending and retrying is :mod:`app_server.failover`'s).

Encoding is per version: a request is validated and encoded with the feature spec of the version its
worker serves, and names that version on the wire. If the worker swapped meanwhile it answers
``version_unavailable`` and the request is re-encoded for the new version, invisibly to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from app_server import metrics
from app_server.error_render import validation_error
from app_server.failover import Dispatcher, Prepared
from app_server.observe import Observer
from app_server.prediction_cache import PredictionCache
from app_server.schemas import VersionSpecs
from app_server.shadow import Shadow
from app_server.variants import Variants
from app_server.worker_conn import WorkerConn
from app_server.workers import WorkerPool
from shared.errors import InvalidInput, ModelError, TooLarge
from shared.features import FeatureSpec, predictions_from
from shared.settings import AppSettings
from shared.signature import to_record_batch

logger = logging.getLogger(__name__)


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
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.feature_store = feature_store
        self.cache = cache
        self.specs = VersionSpecs(pool, entities=feature_store is not None)
        self.dispatcher = dispatcher or Dispatcher(settings, pool)
        self.shadow = Shadow(settings, pool, self.prepare)
        self.variants = Variants(settings, pool, self._predict, self.shadow)
        self._cache_writes: set[asyncio.Future[None]] = set()  # referenced until done, or they may vanish
        self.observer: Observer | None = None
        """Drift and payload log (``app_server/observe.py``): handed each answer, works off the request path."""

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

    async def prepare(self, conn: WorkerConn, model: str, version: str, instances: list[Any]) -> Prepared:
        """Validate ``instances`` for ``model`` ``version`` and encode them with its feature spec (or,
        for a version described by its MLflow signature, pack them as an Arrow table)."""
        takes = await self.specs.get(conn, model, version)
        t0 = time.perf_counter()
        try:
            validated = takes.validator.validate_python(instances)
        except ValidationError as exc:
            raise validation_error(exc, ("instances",)) from None
        rows = [inst.__dict__ for inst in validated]
        spec = takes.spec
        if spec is None:
            x: Any = to_record_batch(rows, takes.arrow)
        else:
            if self.feature_store is not None and spec.entity:
                rows = await self.feature_store.fill(spec, rows)
            x = spec.encoder.encode(rows)
        metrics.child(metrics.ENCODE_DURATION, model).observe(time.perf_counter() - t0)
        return Prepared(version, x, takes.input_name, takes.output_name)

    async def cache_writes_done(self) -> None:
        """Wait for the prediction-cache writes still under way (each bounded by the cache's timeout)."""
        if self._cache_writes:
            await asyncio.gather(*self._cache_writes, return_exceptions=True)

    async def predict(
        self, model: str, instances: list[Any], request_id: str, deadline: float, headers: Any = None
    ) -> dict[str, Any]:
        """Predictions of ``model`` for ``instances``, each row encoded for the version that computes it,
        on the variant the model's traffic policy gives this caller (``headers``: for ``header:NAME``
        stickiness). The answer names the ``variant`` and ``model_version`` that computed it."""
        t0 = time.perf_counter()
        with self.dispatcher.admitted():
            answer = await self.variants.predict(model, instances, request_id, deadline, headers)
        if self.observer is not None:
            self.observer.observe(model, instances, answer, time.perf_counter() - t0)
        return answer

    async def _predict(
        self, model: str, instances: list[Any], request_id: str, deadline: float, version: str | None = None
    ) -> dict[str, Any]:
        prepared: dict[str, Prepared] = {}

        async def prepare(conn: WorkerConn, version: str) -> Prepared:
            if version not in prepared:
                prepared[version] = await self.prepare(conn, model, version, instances)
                await self._look_up_cache(model, prepared[version], deadline)
            return prepared[version]

        reply, p = await self.dispatcher.infer(model, prepare, request_id, deadline, version=version)
        if reply is None:
            return self._from_cache(p, model, request_id)
        return await self._answer(reply, p, model, request_id)

    async def _look_up_cache(self, model: str, p: Prepared, deadline: float) -> None:
        """Mark which rows the cache already answers for this version (one MGET).

        Given at most half the time the request has left: a stalled cache then costs a miss, and the
        request is still computed in time, instead of the cache's own timeout eating the whole budget.
        """
        if self.cache is None or not isinstance(p.x, np.ndarray):  # a table's rows are not cached (yet)
            return
        p.cache_keys = self.cache.keys(model, p.version, p.x)
        p.cached = await self.cache.get(p.cache_keys, timeout_s=max((deadline - time.monotonic()) / 2, 0.0))
        p.todo = np.fromiter((i for i, v in enumerate(p.cached) if v is None), np.intp)

    def _from_cache(self, p: Prepared, model: str, request_id: str) -> dict[str, Any]:
        return {"predictions": p.cached, "model": model, "model_version": p.version, "request_id": request_id}

    async def _answer(self, reply: Any, p: Prepared, model: str, request_id: str) -> dict[str, Any]:
        sent = len(p.to_send)
        if not p.output_name:  # a frame: each row as an object of its columns, as MLflow's server answers
            columns = {n: predictions_from(o) for n, o in reply.tensors.items() if len(o) == sent}
            if not columns or len(columns) != len(reply.tensors):
                raise ModelError(f"model {model} v{reply.header.get('version')} answered without {sent} rows")
            predictions: list[Any] = [
                dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)
            ]
            return {"predictions": predictions, "model": model, "model_version": reply.header.get("version"),
                    "request_id": request_id}  # fmt: skip
        out = reply.tensors.get(p.output_name)
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
