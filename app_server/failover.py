"""Getting one request answered by some worker: pick one serving the model, send, and retry on another
worker (or another version) where that is safe and the deadline allows. ``/predict`` and the v2
``infer`` routes both go through :meth:`Dispatcher.infer`, so they route, retry and fail the same way.

Retried: a worker lost mid-call, a version swapped under the request (re-encoded for the new one), a
worker that is overloaded or still loading the model while another could take the call, and a worker
that no longer serves the model (it left a ``*`` set: it is forgotten until a heartbeat lists the model
again). When no worker is left, the caller gets 404 if no worker lists the model any more and the
settings do not name it, else 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from app_server import metrics
from app_server.admission import note_worker_wait
from app_server.hedging import Hedger
from app_server.worker_conn import WorkerConn
from app_server.workers import WorkerLost, WorkerPool
from shared.errors import (
    DeadlineExceeded,
    ModelError,
    ModelLoading,
    ModelNotFound,
    NoWorkers,
    Overloaded,
    TandemError,
    from_wire,
)
from shared.protocol import Message, Status
from shared.settings import AppSettings

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


@dataclass(slots=True)
class Prepared:
    """A request's tensor, made for one version of the model."""

    version: str
    x: Any
    """A float32 matrix, or a ``pyarrow.RecordBatch`` for a version described by its signature."""
    input_name: str
    output_name: str
    cache_keys: list[str] | None = None
    cached: list[object] | None = None
    """Predictions found in the prediction cache, ``None`` where a row still has to be computed."""
    todo: np.ndarray | None = None
    """Indices of the rows the worker must compute (all of them when ``None``)."""

    @property
    def to_send(self) -> Any:
        return self.x if self.todo is None else self.x[self.todo]


PrepareFn = Callable[[WorkerConn, str], Awaitable[Prepared]]
"""Gives the tensor to send to a worker for the version it serves (see :meth:`Dispatcher.infer`)."""


class Dispatcher:
    def __init__(self, settings: AppSettings, pool: WorkerPool) -> None:
        self.settings = settings
        self.pool = pool
        self.in_flight = 0
        after_ms = settings.hedge_after_ms
        self.hedger = Hedger(settings.hedge_budget, None if after_ms is None else after_ms / 1000)
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)  # read at scrape time, not set per request

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of this app server's in-flight slots; refused at once (503) when all are taken, so a
        flood is shed here instead of queueing in memory."""
        if self.in_flight >= self.settings.max_in_flight:
            raise Overloaded(f"app server holds {self.in_flight} requests already")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def infer(
        self,
        model: str,
        prepare: PrepareFn,
        request_id: str,
        deadline: float,
        version: str | None = None,
    ) -> tuple[Message | None, Prepared]:
        """Send one request's tensor to a worker serving ``model``, retrying where that is safe.

        ``prepare(conn, version)`` gives the tensor for the version the chosen worker serves; it is asked
        again after a swap, so callers that encode per version memoise it. ``version`` pins a version:
        only workers holding it are picked, and a worker that lost it is skipped rather than the request
        re-targeted. Returns the ``ok`` reply, or ``None`` when the prepared tensor has no rows left to
        send (the prediction cache answered).
        """
        excluded: set[str] = set()
        last_error: TandemError | None = None
        for _attempt in range(MAX_ATTEMPTS):
            try:
                conn = self.pool.pick(model, excluded | self._lacking(model, version))
            except NoWorkers as exc:
                raise self._nobody_left(model, last_error or exc) from None
            target = version or conn.live(model) or ""
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    p = await prepare(conn, target)  # may ask the worker for the version's feature spec
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"deadline passed preparing the request for v{target}") from None
                last_error = NoWorkers(f"{conn.endpoint} did not describe v{target} in time")
                excluded.add(conn.endpoint)
                continue
            except (WorkerLost, ModelNotFound, ModelLoading) as exc:  # the describe call's answer
                last_error = self._retry_elsewhere(conn, model, exc, excluded)
                continue
            if p.todo is not None and p.todo.size == 0:
                return None, p
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("deadline passed before the request reached a worker")
            sent = time.monotonic()
            reply = None
            try:
                reply = await self._send(conn, model, target, p, deadline, request_id, excluded)
            except TimeoutError:
                raise DeadlineExceeded(f"no answer within the deadline (worker {conn.endpoint})") from None
            except WorkerLost as exc:
                logger.warning("request %s: %s; retrying elsewhere", request_id, exc.message)
                last_error = self._retry_elsewhere(conn, model, exc, excluded)
                continue
            finally:
                note_worker_wait((reply.received if reply is not None and reply.received else time.monotonic()) - sent)
            status = reply.header.get("status")
            if status == Status.OK:
                answered_for = reply.header.get("model")
                if answered_for not in (None, "", model):  # a worker serving the wrong model is a bug, not a retry
                    raise ModelError(f"worker {conn.endpoint} answered for model {answered_for!r}, not {model!r}")
                return reply, p
            error = from_wire(status or "error", reply.header.get("message", ""))
            if status == Status.VERSION_UNAVAILABLE:
                metrics.child(metrics.RETRIES, "version_unavailable", model).inc()
                live = conn.models.get(model)
                if reply.header.get("version") and live is not None:
                    live.live = str(reply.header["version"])
                if version is not None:
                    excluded.add(conn.endpoint)
                last_error = error
                continue
            if status == Status.MODEL_NOT_FOUND:
                last_error = self._retry_elsewhere(conn, model, error, excluded)
                continue
            if status == Status.MODEL_LOADING:
                _retry_after_from(error, reply.header.get("retry_after_ms"))
            if status in (Status.OVERLOADED, Status.MODEL_LOADING) and self._others(model, conn, excluded):
                last_error = self._retry_elsewhere(conn, model, error, excluded)
                continue
            raise error
        assert last_error is not None
        raise self._nobody_left(model, last_error) if isinstance(last_error, ModelNotFound) else last_error

    async def _send(
        self,
        conn: WorkerConn,
        model: str,
        version: str,
        p: Prepared,
        deadline: float,
        request_id: str,
        excluded: set[str],
    ) -> Message:
        """One call to ``conn``, hedged to another worker holding ``version`` when it is slow."""
        inputs = {p.input_name: p.to_send}
        hedging = self.hedger.enabled

        async def call(c: WorkerConn) -> Message:
            sent = time.monotonic()
            try:
                reply = await self.pool.infer(c, model, version, inputs, max(deadline - sent, 0.001), request_id)
            except asyncio.CancelledError:  # lost to a hedge: at least this slow, which the p95 must see
                self.hedger.observe(model, time.monotonic() - sent)
                raise
            if hedging and reply.header.get("status") == Status.OK:
                self.hedger.observe(model, (reply.received or time.monotonic()) - sent)
            return reply

        def second() -> WorkerConn | None:
            skip = excluded | {conn.endpoint} | self._lacking(model, version)
            try:
                return self.pool.pick(model, skip)
            except NoWorkers:
                return None

        if not hedging or len(self.pool.candidates(model)) < 2:  # nobody to hedge to: no task
            return await call(conn)
        return await self.hedger.call(model, conn, call, second, lambda: deadline - time.monotonic())

    def _retry_elsewhere(self, conn: WorkerConn, model: str, exc: TandemError, excluded: set[str]) -> TandemError:
        """Count a retry, keep ``conn`` out of this request, and return the error to raise if none is left."""
        excluded.add(conn.endpoint)
        if isinstance(exc, ModelNotFound):
            self.pool.forget(conn, model)
            reason = "model_not_found"
        elif isinstance(exc, ModelLoading):
            state = conn.models.get(model)
            if state is not None:
                state.loaded = False  # until its next heartbeat says otherwise: prefer the others meanwhile
            reason = "model_loading"
        elif isinstance(exc, Overloaded):
            reason = "overloaded"
        else:
            reason = "worker_lost"
            exc = NoWorkers(exc.message)
        metrics.child(metrics.RETRIES, reason, model).inc()
        return exc

    def _others(self, model: str, conn: WorkerConn, excluded: set[str]) -> bool:
        return any(c is not conn and c.endpoint not in excluded for c in self.pool.candidates(model))

    def _nobody_left(self, model: str, last_error: TandemError) -> TandemError:
        """What to answer once no worker can take the request: 404 when nothing lists the model any
        more, 503 ``no_workers`` when the last worker to say so has just been forgotten but the model is
        still known, else the last worker's own answer."""
        if not self.pool.knows(model):
            return ModelNotFound(f"no worker serves model {model!r} any more")
        if isinstance(last_error, ModelNotFound):
            return NoWorkers(f"no live worker serves model {model!r}")
        return last_error

    def _lacking(self, model: str, version: str | None) -> set[str]:
        """Endpoints of workers that do not hold ``version`` (none when no version is pinned)."""
        if version is None:
            return set()
        return {c.endpoint for c in self.pool.conns.values() if not c.holds(model, version)}


def _retry_after_from(error: TandemError, retry_after_ms: object) -> None:
    """A ``model_loading`` reply says when the model should be in memory; Retry-After tells the caller."""
    if isinstance(retry_after_ms, int | float) and not isinstance(retry_after_ms, bool) and retry_after_ms > 0:
        error.retry_after_s = min(float(retry_after_ms) / 1000, 3600.0)
