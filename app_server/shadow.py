"""Shadow traffic: a mirrored copy of a request, sent to the shadow version off the caller's path, whose
predictions are compared row by row with the ones production gave the caller.

The copy leaves only once the caller's answer is computed, in a task of its own: it never delays,
fails or changes that answer. It is sent with ``priority="shadow"``, which a worker admits only while
it is under its target utilisation with no backlog (``ml_worker/server.py``), so under load mirrors
are the first thing shed. At most ``--shadow-max-in-flight`` copies are held per app server; beyond,
copies are not sent (``shed``). Outcomes, in ``tandem_shadow_requests_total{model,outcome}``:
``agree`` (every row within ``--shadow-tolerance``), ``differ``, ``error`` (the shadow failed or
answered something that cannot be compared), ``shed``; the per-row difference goes to
``tandem_shadow_abs_diff{model}``. A differing request is logged at INFO with its request id, for
finding its payload in the payload log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from app_server import metrics
from app_server.failover import Prepared
from app_server.worker_conn import WorkerConn
from app_server.workers import WorkerPool
from shared.errors import TandemError
from shared.features import predictions_from
from shared.protocol import Status
from shared.settings import AppSettings

logger = logging.getLogger(__name__)

PRIORITY = "shadow"

PrepareFor = Callable[[WorkerConn, str, str, list[Any]], Awaitable[Prepared]]
"""``(conn, model, version, instances)``: the request encoded for the shadow version."""


class Shadow:
    def __init__(self, settings: AppSettings, pool: WorkerPool, prepare: PrepareFor) -> None:
        self.settings = settings
        self.pool = pool
        self.prepare = prepare
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(self, model: str, version: str, instances: list[Any], answer: list[Any], request_id: str) -> None:
        """Send a copy of the request to ``version`` and compare its predictions with ``answer``, later."""
        if len(self._tasks) >= self.settings.shadow_max_in_flight:
            metrics.child(metrics.SHADOW_REQUESTS, model, "shed").inc()
            return
        task = asyncio.ensure_future(self._run(model, version, instances, answer, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, model: str, version: str, instances: list[Any], answer: list[Any], request_id: str) -> None:
        outcome = "error"
        try:
            outcome = await self._compare(model, version, instances, answer, request_id)
        except (TandemError, TimeoutError) as exc:
            logger.debug("shadow copy of %s for %s v%s failed: %s", request_id, model, version, exc)
        except Exception:  # a bug here must never reach anyone: the caller has its answer already
            logger.exception("shadow copy of %s failed", request_id)
        metrics.child(metrics.SHADOW_REQUESTS, model, outcome).inc()

    async def _compare(self, model: str, version: str, instances: list[Any], answer: list[Any], request_id: str) -> str:
        deadline = time.monotonic() + self.settings.shadow_timeout_ms / 1000
        lacking = {c.endpoint for c in self.pool.conns.values() if not c.holds(model, version)}
        conn = self.pool.pick(model, lacking)
        async with asyncio.timeout(self.settings.shadow_timeout_ms / 1000):
            p = await self.prepare(conn, model, version, instances)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "error"
        reply = await self.pool.infer(
            conn, model, version, {p.input_name: p.x}, remaining, f"{request_id}-shadow", priority=PRIORITY
        )
        status = reply.header.get("status")
        if status == Status.OVERLOADED:
            return "shed"
        if status != Status.OK:
            return "error"
        if not p.output_name:  # a frame: rows of columns, compared as a whole
            columns = {n: predictions_from(o) for n, o in reply.tensors.items()}
            rows = [dict(zip(columns, r, strict=True)) for r in zip(*columns.values(), strict=True)]
            return "agree" if rows == answer else "differ"
        out = reply.tensors.get(p.output_name)
        if out is None:
            return "error"
        return self._judge(model, predictions_from(out), answer, request_id)

    def _judge(self, model: str, shadow: list[Any], answer: list[Any], request_id: str) -> str:
        if len(shadow) != len(answer):
            return "error"
        tolerance = self.settings.shadow_tolerance
        diffs = row_diffs(shadow, answer)
        if diffs is None:  # not numbers (labels, say): equal or not
            return "agree" if shadow == answer else "differ"
        histogram = metrics.child(metrics.SHADOW_ABS_DIFF, model)
        for d in diffs:
            histogram.observe(d)
        if max(diffs, default=0.0) <= tolerance:
            return "agree"
        logger.info(
            "shadow differs from production for request %s (max |diff| %.4g > %.4g)",
            request_id,
            max(diffs),
            tolerance,
            extra={"request_id": request_id, "model": model},
        )
        return "differ"


def row_diffs(a: list[Any], b: list[Any]) -> list[float] | None:
    """Largest absolute difference of each row pair; ``inf`` where their shapes differ; ``None`` when
    the predictions are not numeric."""
    out: list[float] = []
    for x, y in zip(a, b, strict=True):
        try:
            xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError):
            return None
        out.append(float(np.max(np.abs(xa - ya))) if xa.shape == ya.shape and xa.size else float("inf"))
    return out
