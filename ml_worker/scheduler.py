"""The scheduler: which model's batch runs next on the shared executor, running it, and answering it.

The server (``server.py``) admits requests into each model's batcher; this decides, whenever
something changes (a burst of arrivals, a finished batch, a timer it set), what to do now: answer
requests that expired, and while an executor slot is free, start the ready batch of the model the
fair share owes the most (``sharing.FairShare``). A batch runs on an executor thread; its result
comes back as one callback on the loop, which answers every request in it and looks again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_worker import replies
from ml_worker.batcher import Pending
from ml_worker.executor import Executor
from ml_worker.faults import with_faults
from ml_worker.runners import join
from ml_worker.sharing import FairShare
from ml_worker.slots import ModelSlot
from ml_worker.versions import InjectedFault, LoadedVersion
from shared import protocol
from shared.protocol import Status
from shared.settings import WorkerSettings

logger = logging.getLogger(__name__)

EXPIRED = "deadline passed, or could no longer be met, while queued"
LOAD_TOO_SLOW = "the model was loading again (unloaded to stay within the worker's memory budget)"

Send = Callable[[bytes, list[Any]], None]
Outputs = dict[str, np.ndarray]


@dataclass(slots=True)
class Running:
    """A batch on the executor."""

    slot: ModelSlot
    version: LoadedVersion
    batch: list[Pending]
    started: float
    predicted_s: float
    abandoned: bool = False
    """A drain that ran out of time answered its requests already: its result is dropped."""


class Scheduler:
    def __init__(self, settings: WorkerSettings, slots: dict[str, ModelSlot], send: Send, fair: FairShare) -> None:
        self.settings = settings
        self.slots = slots
        self.send = send
        self.fair = fair
        self.executor = Executor(settings.batches_in_flight)
        self.in_flight = 0
        self.running: dict[int, Running] = {}
        """Batches handed to an executor thread and not yet answered, by a token of their own."""
        self._tokens = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.executor.shutdown()

    # -- deciding ------------------------------------------------------------------------------------

    def pump(self) -> None:
        """Answer what expired, start batches while a slot is free, and set one timer for the moment a
        batcher says to look again. Called after every burst of arrivals, every finished batch, and by
        that timer: no task wakes up per request."""
        try:
            self._pump()
        except Exception:  # a batcher bug must not take the receive loop (and the worker) down
            logger.exception("scheduling failed; retrying shortly")
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(0.01, self.pump)

    def _pump(self) -> None:
        now = time.monotonic()
        cap = self.settings.batches_in_flight
        ready: list[tuple[ModelSlot, list[Pending]]] = []
        waits: list[float] = []
        try:
            waits += self._expire_parked(now)
            active = {s.name: s for s in self.slots.values() if s.batcher.depth}
            polled: set[str] = set()
            while self.in_flight < cap and active:
                for name in self.fair.order(n for n in active if n not in polled):
                    slot = active[name]
                    poll = slot.batcher.poll(now, True)
                    self._answer_expired(slot, poll.expired)
                    if poll.batch:
                        self._claim(slot, poll.batch)
                        ready.append((slot, poll.batch))
                        break
                    polled.add(name)
                    if poll.wait_s is not None:
                        waits.append(poll.wait_s)
                else:
                    break  # no model has a batch ready now
                if not slot.batcher.depth:
                    active.pop(name)
            for name, slot in active.items():  # no slot free: expiry only, and when to look again
                if name in polled:
                    continue
                poll = slot.batcher.poll(now, False)
                self._answer_expired(slot, poll.expired)
                if poll.wait_s is not None:
                    waits.append(poll.wait_s)
            for slot in self.slots.values():  # a gauge set takes a lock: only where the depth changed
                depth = slot.batcher.depth
                if depth != slot.reported_depth:
                    slot.reported_depth = depth
                    slot.metrics.queue_depth.set(depth)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if waits:
                self._timer = asyncio.get_running_loop().call_later(max(min(waits), 0.0002), self.pump)
        finally:
            # Batches go to the executor last: a thread woken while this loop still holds the GIL
            # sleeps once more waiting for it. In ``finally``: a batch taken out of a batcher is run
            # even if a later poll failed, or its requests would never be answered.
            for slot, batch in ready:
                self._start(slot, batch, now)

    def _claim(self, slot: ModelSlot, batch: list[Pending]) -> None:
        """Count the batch as in flight and charge its model's fair share with its predicted cost."""
        self.in_flight += 1
        slot.running += 1
        self.fair.dispatched(slot.name, _predicted_s(slot, batch), slot.weight)

    def _answer_expired(self, slot: ModelSlot, expired: list[Pending]) -> None:
        if not expired:
            return
        slot.metrics.requests["expired"].inc(len(expired))
        for p in expired:
            self.send(p.reply_to, replies.to(p, Status.DEADLINE_EXCEEDED, EXPIRED))

    def _expire_parked(self, now: float) -> list[float]:
        """Requests parked for a model that is loading again, whose deadline came first."""
        waits = []
        for slot in self.slots.values():
            if not slot.waiting:
                continue
            late = [p for p in slot.waiting if p.deadline <= now]
            if late:
                slot.waiting = [p for p in slot.waiting if p.deadline > now]
                slot.metrics.requests["model_loading"].inc(len(late))
                for p in late:
                    self.send(p.reply_to, replies.to(p, Status.MODEL_LOADING, LOAD_TOO_SLOW))
            waits += [p.deadline - now for p in slot.waiting]
        return waits

    # -- running -------------------------------------------------------------------------------------

    def _start(self, slot: ModelSlot, batch: list[Pending], started: float) -> None:
        """Hand a batch to an executor thread; :meth:`_finish` answers it on the loop."""
        version = batch[0].version
        loaded = slot.get(version)
        if loaded is None:  # unloaded or retired between admission and now: the app re-encodes
            for p in batch:
                self.send(p.reply_to, replies.version_unavailable(slot, p.msg_id, version))
            self._release(slot)
            asyncio.get_running_loop().call_soon(self.pump)  # the slot is free again
            return
        run = with_faults(loaded.runner.run, self.settings)
        xs = [p.x for p in batch]

        def job() -> dict[str, np.ndarray]:  # the copy into one array is the executor thread's, too
            return run(xs[0] if len(xs) == 1 else join(xs))

        token = next(self._tokens)
        self.running[token] = Running(slot, loaded, batch, started, _predicted_s(slot, batch))
        t0 = time.monotonic()
        self.executor.submit(job, lambda outputs, error: self._finish(token, t0, outputs, error))

    def _release(self, slot: ModelSlot) -> None:
        self.in_flight -= 1
        slot.running -= 1
        if slot.idle:
            self.fair.went_idle(slot.name)

    def _finish(self, token: int, t0: float, outputs: Outputs | None, error: BaseException | None) -> None:
        run = self.running.pop(token)
        try:
            if run.abandoned:  # a drain that ran out of time answered it already
                return
            infer_s = time.monotonic() - t0
            batch, slot, loaded = run.batch, run.slot, run.version
            rows = sum(p.rows for p in batch)
            if error is None and outputs is not None:
                # Checked before any reply is built: slicing an output without a row per input row
                # (a scalar, say) would raise halfway and leave the batch's requests unanswered.
                bad = [n for n, o in outputs.items() if np.ndim(o) == 0 or len(o) != rows]
                if bad:
                    error = ValueError(f"outputs {bad} do not have one row per input row ({rows})")
            if error is not None or outputs is None:
                self._answer_failed(loaded, batch, rows, error, slot)
                return
            self._answer(loaded, batch, run.started, infer_s, outputs)
            # Bookkeeping after the replies have left: the cost model's refit is not the callers' wait.
            slot.batcher.observe(loaded.version, rows, infer_s)
            self.fair.correct(slot.name, run.predicted_s, infer_s, slot.weight)
            m = slot.metrics
            m.batch_size.observe(rows)
            m.inference.observe(infer_s)
            m.requests["ok"].inc(len(batch))
            for p in batch:
                m.queue_wait.observe(run.started - p.arrival)
        finally:
            self._release(run.slot)
            self.pump()

    def _answer_failed(
        self, loaded: LoadedVersion, batch: list[Pending], rows: int, exc: BaseException | None, slot: ModelSlot
    ) -> None:
        logger.error(
            "%s v%s failed on a batch of %d rows",
            loaded.name,
            loaded.version,
            rows,
            exc_info=exc,
            extra={"request_ids": [p.request_id for p in batch]},
        )
        slot.metrics.requests["error"].inc(len(batch))
        message = f"model {loaded.name} v{loaded.version} failed: {exc}"
        for p in batch:
            self.send(p.reply_to, replies.to(p, Status.ERROR, message))

    def _answer(
        self, loaded: LoadedVersion, batch: list[Pending], started: float, infer_s: float, outputs: Outputs
    ) -> None:
        rows = sum(p.rows for p in batch)
        offset = 0
        done = time.monotonic()
        log_all, slow_s = self.settings.log_requests, self.settings.slow_request_ms / 1000
        name, version = loaded.name, loaded.version
        enveloped: dict[bytes, list[list[Any]]] = {}  # replies to callers that take them in one envelope
        for p in batch:
            n = p.rows
            timing = {"queue_ms": (started - p.arrival) * 1000, "infer_ms": infer_s * 1000, "batch_size": rows}
            if log_all or done - p.arrival >= slow_s:
                logger.info(
                    "request %s answered in %.1f ms",
                    p.request_id or p.msg_id,
                    (done - p.arrival) * 1000,
                    extra={"request_id": p.request_id, "model": name, "model_version": version, **timing},
                )
            out = {o_name: o[offset : offset + n] for o_name, o in outputs.items()}
            offset += n
            try:
                if loaded.fail_percent and random.random() * 100 < loaded.fail_percent:
                    raise InjectedFault(f"{loaded.fail_percent:g}% of requests fail on purpose (a drill version)")
                frames = protocol.reply(p.msg_id, Status.OK, version=version, model=name, outputs=out, timing=timing)
            except InjectedFault as exc:
                frames = replies.to(p, Status.ERROR, f"model {name} v{version} failed: {exc.message}")
            except Exception as exc:  # e.g. an output dtype the wire cannot carry: answered, not lost
                frames = replies.to(p, Status.ERROR, f"model {name} v{version}: cannot send outputs: {exc}")
            if p.batch_replies:
                enveloped.setdefault(p.reply_to, []).append(frames)
            else:
                self.send(p.reply_to, frames)
        for ident, frames_list in enveloped.items():
            self.send(ident, frames_list[0] if len(frames_list) == 1 else protocol.pack_batch(frames_list))

    def take_running(self) -> list[Pending]:
        """Every request of the batches still on the executor; their late results will be dropped."""
        held = []
        for run in self.running.values():
            if not run.abandoned:
                run.abandoned = True
                held += run.batch
        return held


def _predicted_s(slot: ModelSlot, batch: list[Pending]) -> float:
    cost = getattr(slot.batcher, "cost", None)
    return cost(batch[0].version).predict(sum(p.rows for p in batch)) if cost else 0.0
