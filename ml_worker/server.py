"""The worker process: a ZeroMQ ROUTER loop that admits requests into each model's batcher.

The event loop only moves messages: it parses frames, admits requests into the batcher of the model
they name, and sends replies; execution (which batch runs next, running it, answering it) is
``scheduler.py``. It never waits on a model, so pings, admissions and deadline checks keep flowing while
a batch runs, and the next batch forms meanwhile. A worker serves a set of models (``--models``), each
in a :class:`~ml_worker.slots.ModelSlot` with its own versions, batcher and registry watch; they share
the executor fairly and the memory budget. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import zmq

from ml_worker import metrics, replies
from ml_worker.auth import CurveGuard
from ml_worker.batcher import Pending
from ml_worker.loader import Loader
from ml_worker.model_set import REFUSED, ModelSet, make_batcher
from ml_worker.residency import Residency
from ml_worker.scheduler import Scheduler
from ml_worker.sharing import FairShare
from ml_worker.slots import ModelSlot
from shared import protocol
from shared.errors import ProtocolError
from shared.protocol import Kind, Status
from shared.runtime import tune_gc
from shared.settings import WorkerSettings
from shared.transport import LoopSocket, make_socket

logger = logging.getLogger(__name__)

SHADOW_PRIORITY = "shadow"
"""``priority`` of a request header for a shadow copy (``shared.traffic``): admitted only with room."""
SHED = "shadow copy shed: the worker is past its target utilisation"
ABANDONED = "worker shut down before answering (drain timed out); safe to retry elsewhere"

__all__ = ["WorkerServer", "make_batcher", "run_worker"]


class WorkerServer:
    def __init__(self, settings: WorkerSettings, *, slots: Iterable[ModelSlot] = ()) -> None:
        """``slots``: models to serve already loaded (tests); otherwise ``settings.targets()`` are
        followed in the registry once :meth:`serve` runs."""
        self.settings = settings
        self._guard = CurveGuard.from_settings(settings)  # a bad key file stops the worker here, unbound
        self._ctx = zmq.Context()
        if self._guard is not None:
            self._guard.start(self._ctx)  # before the socket binds: see ml_worker/auth.py
        self.sock = make_socket(
            self._ctx, zmq.ROUTER, bind=settings.bind, curve=self._guard.keys if self._guard else None
        )
        if self._guard is not None:
            self._guard.watch(self.sock)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        cache = settings.cache_dir or (settings.home / "cache" if settings.home else None)
        self.cache_dir = Path(cache or tempfile.mkdtemp(prefix="tandem-cache-"))
        loader = Loader(settings, self.cache_dir, Residency(settings.max_resident_mb), lambda: list(self.models))
        fair = FairShare()
        self.models = ModelSet(settings, loader, fair, self._send, lambda: self.scheduler.pump())
        self.scheduler = Scheduler(settings, self.models.slots, self._send, fair)
        # Every message of a burst is handled, then batches are formed once for the whole burst
        # (pump): no task wakes up per request.
        self._io = LoopSocket(self.sock, self._handle_safely, after_burst=self.scheduler.pump)
        self._draining = False
        self._tasks: list[asyncio.Task[Any]] = []
        for slot in slots:
            self.models.add(slot)
        self.models.add_configured()

    @property
    def slots(self) -> dict[str, ModelSlot]:
        return self.models.slots

    # -- lifecycle -----------------------------------------------------------------------------------

    async def serve(self, *, watch: bool = True) -> None:
        """Run until cancelled or drained."""
        targets = ", ".join(map(str, self.models.targets))
        logger.info("worker listening on %s (models %s)", self.endpoint, targets)
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._housekeeping())]
        if self._guard is not None:
            self._tasks.append(asyncio.create_task(self._guard.run()))
        if watch:
            self._tasks += self.models.start_watching()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for t in self._tasks:
                t.cancel()
            self.models.stop()
            self.close()

    @property
    def ready(self) -> bool:
        """At least one model is live: a worker serving many must not be taken out of every model's
        rotation because one of them has no loadable version."""
        return not self._draining and any(s.live_version is not None for s in self.slots.values())

    @property
    def depth(self) -> int:
        return sum(s.batcher.depth + len(s.waiting) for s in self.slots.values())

    def close(self) -> None:
        if self._guard is not None:
            self._guard.stop_monitor()
        self._io.close(linger=500)  # let the last replies of a drain leave
        if self._guard is not None:
            self._guard.stop()  # only now: a CURVE socket with no ZAP handler admits any key
        self._ctx.term()
        self.scheduler.close()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop admitting work, answer everything held, then stop serving.

        New requests are refused (``overloaded``, so the app retries elsewhere) for at least
        ``drain_grace_s``: long enough for app servers to see ``draining`` in a heartbeat and stop
        routing here before the socket closes.
        """
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        self._draining = True
        logger.info("draining: %d rows queued, %d batches running", self.depth, self.scheduler.in_flight)
        start = time.monotonic()
        while time.monotonic() - start < timeout_s and (
            self.depth or self.scheduler.in_flight or time.monotonic() - start < self.settings.drain_grace_s
        ):
            self.scheduler.pump()
            await asyncio.sleep(0.01)
        if self.depth or self.scheduler.running:
            self._abandon()
        logger.info("drained in %.2f s", time.monotonic() - start)
        for t in self._tasks:
            t.cancel()

    def _abandon(self) -> None:
        """The drain ran out of time: answer what is still held, queued or running, before the socket
        closes, as ``overloaded`` so app servers retry it elsewhere. A running batch's late result is
        then dropped by the scheduler, so nothing is answered twice."""
        held = [p for s in self.slots.values() for p in [*s.batcher.take_all(), *s.waiting]]
        for s in self.slots.values():
            s.waiting = []
        running = self.scheduler.take_running()
        logger.warning("drain timed out: %d queued and %d running requests answered", len(held), len(running))
        for p in held + running:
            self._count(p.model, "overloaded")
            self._send(p.reply_to, replies.to(p, Status.OVERLOADED, ABANDONED))

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.models.housekeeping(time.monotonic())

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
        if self._guard is not None and not self._guard.admits(frames[-1]):
            return  # its key was removed from the authorised set since it connected
        ident = frames[0].bytes
        try:
            messages = protocol.split(frames[1:])
        except ProtocolError as exc:
            self._count("", "bad_request")
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
            self._count("", "bad_request")
            logger.warning("bad message: %s", exc.message)
            self._send(ident, protocol.reply(protocol.protocol_error_id(exc), Status.BAD_REQUEST, message=exc.message))
            return
        kind = msg.header["kind"]
        if kind == Kind.PING:
            self._send(ident, protocol.reply(msg.id, Status.OK, **self.heartbeat()))
        elif kind == Kind.INFER:
            self._admit(ident, msg)
        elif kind == Kind.DESCRIBE:
            self._describe(ident, msg)
        elif kind == Kind.CANCEL:
            self._cancel(msg.header.get("target"))

    def heartbeat(self) -> dict[str, Any]:
        now = time.monotonic()
        serving = [s for s in self.slots.values() if not s.leaving]
        share = self.models.share
        return {
            "models": {s.name: s.heartbeat(now) for s in serving},
            "device": next((s.device for s in serving if s.device), None),
            "queue_depth": self.depth,
            "est_wait_ms": (share.free_at(now) - now + share.backlog_s()) * 1000,
            "in_flight": self.scheduler.in_flight,
            "draining": self._draining,
        }

    def _describe(self, ident: bytes, msg: protocol.Message) -> None:
        slot = self.models.get(msg.header.get("model"))
        version = msg.header.get("version")
        if slot is None:
            self._send(ident, replies.not_served(msg.id, msg.header.get("model")))
            return
        desc = slot.describe(version)
        if desc is None:
            self._send(ident, replies.version_unavailable(slot, msg.id, version))
        else:
            reply = protocol.reply(msg.id, Status.OK, version=desc["version"], model=slot.name, describe=desc)
            self._send(ident, reply)

    def _cancel(self, target: Any) -> None:
        if not isinstance(target, str):
            return
        for slot in self.slots.values():
            if slot.batcher.cancel(target):
                slot.metrics.requests["cancelled"].inc()
                return
            for p in slot.waiting:
                if p.msg_id == target:
                    slot.waiting.remove(p)
                    slot.metrics.requests["cancelled"].inc()
                    return

    # -- admission -----------------------------------------------------------------------------------

    def _admit(self, ident: bytes, msg: protocol.Message) -> None:
        now = time.monotonic()
        header = msg.header
        if self._draining:
            self._count("", "overloaded")
            self._send(ident, protocol.reply(msg.id, Status.OVERLOADED, message="worker is draining"))
            return
        slot = self.models.get(header.get("model"))
        if slot is None:
            self._count("", "model_not_found")
            self._send(ident, replies.not_served(msg.id, header.get("model")))
            return
        slot.last_used = now
        version = header.get("version")
        loaded = slot.get(version)
        wire_input = loaded.wire_input if loaded is not None else None
        if loaded is None and slot.unloaded is not None and version in (None, slot.unloaded.version):
            wire_input = slot.unloaded.wire_input  # unloaded to save memory: checked now, loaded again below
        if wire_input is None:
            slot.metrics.requests["version_unavailable"].inc()
            self._send(ident, replies.version_unavailable(slot, msg.id, version))
            return
        served = loaded.version if loaded is not None else slot.live_version

        def refuse(status: Status, outcome: str, message: str) -> None:
            slot.metrics.requests[outcome].inc()
            self._send(ident, protocol.reply(msg.id, status, version=served, model=slot.name, message=message))

        x = msg.tensors.get(wire_input.name)
        if (why := wire_input.refusal(x)) is not None:
            return refuse(Status.BAD_REQUEST, "bad_request", why)
        budget = header.get("budget_ms")
        if not isinstance(budget, int | float) or isinstance(budget, bool) or not math.isfinite(budget):
            return refuse(Status.BAD_REQUEST, "bad_request", f"budget_ms must be a number, got {budget!r:.40}")
        if budget <= 0:
            return refuse(Status.DEADLINE_EXCEEDED, "expired", "no budget left")
        item = Pending(
            msg.id,
            served or "",
            x,
            now,
            now + budget / 1000,
            reply_to=ident,
            request_id=str(header.get("request_id") or ""),
            batch_replies=header.get("batch_replies") is True,
            model=slot.name,
        )
        if header.get("priority") == SHADOW_PRIORITY and not self._room_for_shadow(now):
            # Counted apart from "overloaded": shedding a mirror is the policy working, not an overload.
            metrics.SHADOW_SHED.labels(slot.name).inc()
            self._send(ident, protocol.reply(msg.id, Status.OVERLOADED, version=served, model=slot.name, message=SHED))
            return None
        if loaded is None:
            self.models.park(slot, item, now)
        elif not slot.batcher.offer(item, now):
            refuse(Status.OVERLOADED, "overloaded", REFUSED)
        return None

    def _room_for_shadow(self, now: float) -> bool:
        """Whether a shadow copy may be admitted: the executor is under its target utilisation and has no
        backlog beyond one latency window. Callers' requests never wait behind a mirror that came when the
        worker was busy; a mirror is the first thing shed."""
        s = self.settings
        serving = list(self.slots.values())
        if sum(sl.batcher.utilization(now) for sl in serving) >= s.target_utilization:
            return False
        share = self.models.share
        return share.free_at(now) - now + share.backlog_s() <= s.max_latency_ms / 1000

    def _count(self, model: str, outcome: str) -> None:
        slot = self.slots.get(model)
        (slot.metrics if slot is not None else metrics.UNKNOWN).requests[outcome].inc()

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
