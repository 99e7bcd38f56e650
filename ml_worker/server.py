"""The worker process: a ZeroMQ ROUTER loop, a batcher, and model threads (``model_threads.py``).

The event loop only moves messages: it parses frames, admits requests into the batcher, hands batches
to a model thread and sends replies. It never waits on the model, so pings, admissions and deadline
checks keep flowing while a batch runs, and the next batch forms meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from ml_worker import metrics
from ml_worker.adaptive import AdaptiveBatcher
from ml_worker.batcher import Batcher, Pending, SimpleBatcher
from ml_worker.model_threads import ModelThreads
from ml_worker.models import LoadedModel, ModelStore
from ml_worker.registry_watch import RegistryWatcher
from shared import protocol
from shared.errors import ProtocolError
from shared.protocol import Kind, Status
from shared.runtime import tune_gc
from shared.settings import WorkerSettings
from shared.transport import LoopSocket, make_socket

logger = logging.getLogger(__name__)

REFUSED = "cannot finish within the request's budget: queue too long"
EXPIRED = "deadline passed, or could no longer be met, while queued"
ABANDONED = "worker shut down before answering (drain timed out); safe to retry elsewhere"


def make_batcher(settings: WorkerSettings) -> Batcher:
    if settings.batcher == "adaptive":
        return AdaptiveBatcher(
            max_batch_size=settings.max_batch_size,
            max_latency_s=settings.max_latency_ms / 1000,
            max_queue=settings.max_queue,
            target_utilization=settings.target_utilization,
        )
    return SimpleBatcher(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue)


class WorkerServer:
    def __init__(
        self, settings: WorkerSettings, *, store: ModelStore | None = None, batcher: Batcher | None = None
    ) -> None:
        self.settings = settings
        self.store = store or ModelStore(settings.model, settings.keep_previous_s)
        self.batcher = batcher or make_batcher(settings)
        self._models = ModelThreads(settings.batches_in_flight)
        self._in_flight = 0
        self._running: dict[int, list[Pending]] = {}
        """Batches handed to a model thread and not yet answered, by a token of their own."""
        self._tokens = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._draining = False
        self._ctx = zmq.Context()
        self.sock = make_socket(self._ctx, zmq.ROUTER, bind=settings.bind)
        # Every message of a burst is handled, then batches are formed once for the whole burst
        # (pump): no task wakes up per request.
        self._io = LoopSocket(self.sock, self._handle_safely, after_burst=self.pump)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        cache = settings.cache_dir or (settings.home / "cache" if settings.home else None)
        self.cache_dir = Path(cache or tempfile.mkdtemp(prefix="tandem-cache-"))
        self.watcher = RegistryWatcher(settings, self.store, self.cache_dir)
        self._tasks: list[asyncio.Task[Any]] = []

    async def serve(self, *, watch: bool = True) -> None:
        """Run until cancelled or drained."""
        logger.info("worker listening on %s (model %s, %s)", self.endpoint, self.settings.model, self.watcher.target)
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._retire_loop())]
        if watch:
            self._tasks.append(asyncio.create_task(self.watcher.run()))
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for t in self._tasks:
                t.cancel()
            self.close()

    @property
    def ready(self) -> bool:
        return self.store.live is not None and not self._draining

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._io.close(linger=500)  # let the last replies of a drain leave
        self._ctx.term()
        self._models.shutdown()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop admitting work, answer everything held, then stop serving.

        New requests are refused (``overloaded``, so the app retries elsewhere) for at least
        ``drain_grace_s``: long enough for app servers to see ``draining`` in a heartbeat and stop
        routing here before the socket closes.
        """
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        self._draining = True
        logger.info("draining: %d rows queued, %d batches running", self.batcher.depth, self._in_flight)
        start = time.monotonic()
        while time.monotonic() - start < timeout_s and (
            self.batcher.depth or self._in_flight or time.monotonic() - start < self.settings.drain_grace_s
        ):
            self.pump()
            await asyncio.sleep(0.01)
        if self.batcher.depth or self._running:
            self._abandon()
        logger.info("drained in %.2f s", time.monotonic() - start)
        for t in self._tasks:
            t.cancel()

    def _abandon(self) -> None:
        """The drain ran out of time: answer what is still held, queued or running, before the socket
        closes, as ``overloaded`` so app servers retry it elsewhere. A running batch's late result is
        then dropped by :meth:`_finish`, so nothing is answered twice."""
        held = self.batcher.take_all()
        running = [p for batch in self._running.values() for p in batch]
        self._running.clear()
        logger.warning("drain timed out: %d queued and %d running requests answered", len(held), len(running))
        metrics.REQUESTS.labels("overloaded").inc(len(held) + len(running))
        for p in held + running:
            self._send(p.reply_to, protocol.reply(p.msg_id, Status.OVERLOADED, version=p.version, message=ABANDONED))
        metrics.QUEUE_DEPTH.set(self.batcher.depth)

    # -- receiving -----------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """Messages are read by the socket's reader callback (``LoopSocket``) while this runs."""
        self._io.start()
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._io.stop()

    def _handle_safely(self, frames: list[Any]) -> None:
        """A message that breaks handling still gets an answer, and never stops the loop. An envelope
        of several (``protocol.split``) is handled one message at a time."""
        ident = frames[0].bytes
        try:
            messages = protocol.split(frames[1:])
        except ProtocolError as exc:
            metrics.REQUESTS.labels("bad_request").inc()
            logger.warning("bad message: %s", exc.message)
            self._send(ident, protocol.reply(None, Status.BAD_REQUEST, message=exc.message))
            return
        for header, message in messages:
            try:
                self._handle(ident, message, header)
            except Exception as exc:
                logger.exception("unhandled error handling a message")
                msg_id = None
                with contextlib.suppress(Exception):
                    msg_id = protocol.parse_request(message).id
                with contextlib.suppress(Exception):
                    self._send(ident, protocol.reply(msg_id, Status.ERROR, message=f"worker error: {exc}"))

    def _handle(self, ident: bytes, frames: Sequence[Any], header: dict[str, Any] | None = None) -> None:
        try:
            msg = protocol.parse_request(frames, header)
        except ProtocolError as exc:
            metrics.REQUESTS.labels("bad_request").inc()
            logger.warning("bad message: %s", exc.message)
            self._send(ident, protocol.reply(protocol.protocol_error_id(exc), Status.BAD_REQUEST, message=exc.message))
            return
        kind = msg.header["kind"]
        if kind == Kind.PING:
            self._send(ident, protocol.reply(msg.id, Status.OK, **self.heartbeat()))
        elif kind == Kind.INFER:
            self._admit(ident, msg)
        elif kind == Kind.DESCRIBE:
            model = self.store.get(msg.header.get("version"))
            if model is None:
                self._send(ident, self._version_unavailable(msg.id, msg.header.get("version")))
            else:
                self._send(ident, protocol.reply(msg.id, Status.OK, version=model.version, describe=model.describe()))
        elif kind == Kind.CANCEL:
            target = msg.header.get("target")
            if isinstance(target, str) and self.batcher.cancel(target):
                metrics.REQUESTS.labels("cancelled").inc()
                metrics.QUEUE_DEPTH.set(self.batcher.depth)

    def heartbeat(self) -> dict[str, Any]:
        live = self.store.live
        return {
            "models": {self.store.name: {"live": live.version if live else None, "resident": self.store.versions}},
            "device": live.device if live else None,
            "queue_depth": self.batcher.depth,
            "est_wait_ms": self.batcher.estimated_wait_s(time.monotonic()) * 1000,
            "in_flight": self._in_flight,
            "draining": self._draining,
        }

    def _version_unavailable(self, msg_id: str, version: Any) -> list[Any]:
        live = self.store.live
        return protocol.reply(
            msg_id,
            Status.VERSION_UNAVAILABLE,
            version=live.version if live else None,
            message=f"version {version} is not loaded on this worker",
        )

    def _admit(self, ident: bytes, msg: protocol.Message) -> None:
        now = time.monotonic()
        header = msg.header
        if self._draining:
            metrics.REQUESTS.labels("overloaded").inc()
            self._send(ident, protocol.reply(msg.id, Status.OVERLOADED, message="worker is draining"))
            return
        model = self.store.get(header.get("version"))
        if model is None:
            self._send(ident, self._version_unavailable(msg.id, header.get("version")))
            return
        # Issue 3: seed the adaptive batcher's cost model from the version's warm-up timings (a no-op
        # once seeded, and for batchers without a cost model).
        if seed := getattr(self.batcher, "seed", None):
            seed(model.version, model.warm_timings)
        x = msg.tensors.get(model.spec.input_name)
        if x is None or x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != model.spec.width or x.dtype != np.float32:
            metrics.REQUESTS.labels("bad_request").inc()
            got = f"{x.dtype}{list(x.shape)}" if x is not None else "nothing"
            self._send(
                ident,
                protocol.reply(
                    msg.id,
                    Status.BAD_REQUEST,
                    version=model.version,
                    message=f"{model.spec.input_name!r} must be float32[n, {model.spec.width}], n >= 1, got {got}",
                ),
            )
            return
        budget = header.get("budget_ms")
        if not isinstance(budget, int | float) or isinstance(budget, bool) or not math.isfinite(budget):
            metrics.REQUESTS.labels("bad_request").inc()
            self._send(
                ident,
                protocol.reply(msg.id, Status.BAD_REQUEST, message=f"budget_ms must be a number, got {budget!r:.40}"),
            )
            return
        budget_s = budget / 1000
        if budget_s <= 0:
            metrics.REQUESTS.labels("expired").inc()
            self._send(
                ident, protocol.reply(msg.id, Status.DEADLINE_EXCEEDED, version=model.version, message="no budget left")
            )
            return
        item = Pending(
            msg.id,
            model.version,
            x,
            now,
            now + budget_s,
            reply_to=ident,
            request_id=str(header.get("request_id") or ""),
            batch_replies=header.get("batch_replies") is True,
        )
        if not self.batcher.offer(item, now):
            metrics.REQUESTS.labels("overloaded").inc()
            self._send(ident, protocol.reply(msg.id, Status.OVERLOADED, version=model.version, message=REFUSED))
            return
        metrics.QUEUE_DEPTH.set(self.batcher.depth)

    # -- dispatching ---------------------------------------------------------------------------------

    def pump(self) -> None:
        """Ask the batcher what to do now: answer expired requests, start batches while a slot is
        free, and set one timer for the moment it says to look again. Called after every burst of
        arrivals, every finished batch, and by that timer: no task wakes up per request."""
        try:
            self._pump()
        except Exception:  # a batcher bug must not take the receive loop (and the worker) down
            logger.exception("batcher failed; retrying shortly")
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(0.01, self.pump)

    def _pump(self) -> None:
        now = time.monotonic()
        ready: list[list[Pending]] = []
        try:
            while True:
                poll = self.batcher.poll(now, self._in_flight < self.settings.batches_in_flight)
                for p in poll.expired:
                    metrics.REQUESTS.labels("expired").inc()
                    self._send(
                        p.reply_to,
                        protocol.reply(p.msg_id, Status.DEADLINE_EXCEEDED, version=p.version, message=EXPIRED),
                    )
                if not poll.batch:
                    break
                self._in_flight += 1
                ready.append(poll.batch)
            metrics.QUEUE_DEPTH.set(self.batcher.depth)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if poll.wait_s is not None:
                self._timer = asyncio.get_running_loop().call_later(max(poll.wait_s, 0.0002), self.pump)
        finally:
            # Batches go to the model threads last: a model thread woken while this loop still holds
            # the GIL sleeps once more waiting for it. In ``finally``: a batch taken out of the
            # batcher is run even if a later poll failed, or its requests would never be answered.
            for batch in ready:
                self._start(batch, now)

    def _start(self, batch: list[Pending], started: float) -> None:
        """Hand a batch to a model thread; :meth:`_finish` answers it on the loop."""
        version = batch[0].version
        model = self.store.get(version)
        if model is None:
            for p in batch:
                self._send(p.reply_to, self._version_unavailable(p.msg_id, version))
            self._in_flight -= 1
            asyncio.get_running_loop().call_soon(self.pump)  # the slot is free again
            return
        run = model.runner.run if not self.settings.debug_delay_ms else self._delayed(model.runner.run)
        xs = [p.x for p in batch]

        def job() -> dict[str, np.ndarray]:  # the copy into one array is the model thread's, too
            return run(xs[0] if len(xs) == 1 else np.concatenate(xs))

        t0 = time.monotonic()
        token = next(self._tokens)
        self._running[token] = batch
        self._models.submit(job, lambda outputs, error: self._finish(token, model, started, t0, outputs, error))

    def _finish(
        self,
        token: int,
        model: LoadedModel,
        started: float,
        t0: float,
        outputs: dict[str, np.ndarray] | None,
        error: BaseException | None,
    ) -> None:
        try:
            batch = self._running.pop(token, None)
            if batch is None:  # a drain that ran out of time answered it already
                return
            infer_s = time.monotonic() - t0
            rows = sum(p.rows for p in batch)
            if error is None and outputs is not None:
                # Checked before any reply is built: slicing an output without a row per input row
                # (a scalar, say) would raise halfway and leave the batch's requests unanswered.
                bad = [n for n, o in outputs.items() if np.ndim(o) == 0 or len(o) != rows]
                if bad:
                    error = ValueError(f"outputs {bad} do not have one row per input row ({rows})")
            if error is not None or outputs is None:
                self._answer_failed(model, batch, rows, error)
                return
            self._answer(model, batch, started, infer_s, outputs)
            # Bookkeeping after the replies have left: the cost model's refit is not the callers' wait.
            self.batcher.observe(model.version, rows, infer_s)
            metrics.BATCH_SIZE.observe(rows)
            metrics.INFERENCE.observe(infer_s)
            metrics.REQUESTS.labels("ok").inc(len(batch))
            for p in batch:
                metrics.QUEUE_WAIT.observe(started - p.arrival)
        finally:
            self._in_flight -= 1
            self.pump()

    def _answer_failed(self, model: LoadedModel, batch: list[Pending], rows: int, exc: BaseException | None) -> None:
        logger.error(
            "%s v%s failed on a batch of %d rows",
            model.name,
            model.version,
            rows,
            exc_info=exc,
            extra={"request_ids": [p.request_id for p in batch]},
        )
        metrics.REQUESTS.labels("error").inc(len(batch))
        message = f"model {model.name} v{model.version} failed: {exc}"
        for p in batch:
            self._send(p.reply_to, protocol.reply(p.msg_id, Status.ERROR, version=model.version, message=message))

    def _answer(
        self, model: LoadedModel, batch: list[Pending], started: float, infer_s: float, outputs: dict[str, np.ndarray]
    ) -> None:
        rows = sum(p.rows for p in batch)
        offset = 0
        done = time.monotonic()
        log_all, slow_s = self.settings.log_requests, self.settings.slow_request_ms / 1000
        enveloped: dict[bytes, list[list[Any]]] = {}  # replies to callers that take them in one envelope
        for p in batch:
            n = p.rows
            timing = {"queue_ms": (started - p.arrival) * 1000, "infer_ms": infer_s * 1000, "batch_size": rows}
            if log_all or done - p.arrival >= slow_s:
                logger.info(
                    "request %s answered in %.1f ms",
                    p.request_id or p.msg_id,
                    (done - p.arrival) * 1000,
                    extra={"request_id": p.request_id, "model": model.name, "model_version": model.version, **timing},
                )
            out = {name: o[offset : offset + n] for name, o in outputs.items()}
            offset += n
            try:
                frames = protocol.reply(p.msg_id, Status.OK, version=model.version, outputs=out, timing=timing)
            except Exception as exc:  # e.g. an output dtype the wire cannot carry: answered, not lost
                frames = protocol.reply(
                    p.msg_id,
                    Status.ERROR,
                    version=model.version,
                    message=f"model {model.name} v{model.version}: cannot send outputs: {exc}",
                )
            if p.batch_replies:
                enveloped.setdefault(p.reply_to, []).append(frames)
            else:
                self._send(p.reply_to, frames)
        for ident, replies in enveloped.items():
            self._send(ident, replies[0] if len(replies) == 1 else protocol.pack_batch(replies))

    def _delayed(self, run: Any) -> Any:
        delay_s = self.settings.debug_delay_ms / 1000

        def slow_run(x: np.ndarray) -> dict[str, np.ndarray]:
            time.sleep(delay_s)
            return run(x)

        return slow_run

    async def _retire_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.store.retire_due(time.monotonic())

    def _send(self, ident: bytes, frames: list[Any]) -> None:
        """Reply without awaiting: a ROUTER send completes at once (or drops for a vanished peer)."""
        try:
            self._io.send([ident, *frames])
        except zmq.ZMQError as exc:
            logger.warning("could not send reply: %s", exc)


async def run_worker(settings: WorkerSettings) -> None:
    server = WorkerServer(settings)
    if settings.metrics_port:
        from ml_worker.http import set_readiness, start_http

        set_readiness(lambda: server.ready)
        start_http(settings.metrics_port)
    tune_gc()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.drain()))
    with contextlib.suppress(asyncio.CancelledError):
        await server.serve()
    logger.info("worker stopped")
