"""The pool of workers as the app server sees it: discovery, heartbeats, routing and calls.

One DEALER socket per worker, each with its own receive task that resolves the futures of calls by
message id. A heartbeat task pings every worker; a worker silent for three intervals leaves the pool
(and its outstanding calls fail over at once), and rejoins when it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from app_server import metrics
from app_server.admission import note_worker_wait
from app_server.worker_conn import HANDSHAKE_FAILED, HANDSHAKE_RETRY_S, MONITORED, RETRIED_BY_ZMQ, WorkerConn
from shared import curve, protocol
from shared.errors import NoWorkers, ProtocolError, TandemError, from_wire
from shared.protocol import Kind, Status
from shared.settings import AppSettings
from shared.transport import LoopSocket, make_socket

logger = logging.getLogger(__name__)

MISSED_HEARTBEATS = 3
TRANSIT_MARGIN_MS = 2.0


class WorkerLost(TandemError):
    """The worker holding a call left the pool or refused the message; the call may be retried."""

    http_status, code, retry_after_s = 503, "no_workers", 1.0


def _send_now(conn: WorkerConn, frames: list[Any]) -> None:
    """Send without blocking or awaiting; raises zmq.Again when the worker is not connected (IMMEDIATE)."""
    conn.io.send(frames)


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class WorkerPool:
    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.interval = settings.heartbeat_interval
        self._curve = curve.client_keys(settings)  # a bad key file stops the app server before it serves
        self._ctx = zmq.asyncio.Context()
        self.conns: dict[str, WorkerConn] = {}
        self._ids = itertools.count()
        # Unique across app server replicas (pids repeat across containers): a cancel names one call.
        self._prefix = f"{uuid.uuid4().hex[:12]}-"
        self._tasks: list[asyncio.Task[None]] = []
        self._describe_cache: dict[tuple[str, str], dict[str, Any]] = {}
        self.required = frozenset(settings.required_models())
        """Models the settings name: known (503 while nobody serves them, never 404) and in readiness."""
        self._gauged: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._sync_endpoints(await self._discover())
        self._tasks = [asyncio.create_task(self._heartbeat_loop())]
        if any(u.startswith("dns+") for u in self.settings.worker_endpoints()):
            self._tasks.append(asyncio.create_task(self._discovery_loop()))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for conn in list(self.conns.values()):
            self._remove(conn)
        self._ctx.term()

    async def _discover(self) -> list[str]:
        endpoints: list[str] = []
        for url in self.settings.worker_endpoints():
            if not url.startswith("dns+"):
                endpoints.append(url)
                continue
            parsed = urlparse(url.removeprefix("dns+"))
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    parsed.hostname, parsed.port, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                logger.warning("cannot resolve %s: %s", url, exc)
                continue
            for info in infos:
                host = info[4][0]
                endpoints.append(f"tcp://[{host}]:{parsed.port}" if ":" in host else f"tcp://{host}:{parsed.port}")
        return sorted(set(endpoints))

    async def _discovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.dns_refresh_s)
            found = await self._discover()
            if found:  # a failed lookup never empties the pool
                self._sync_endpoints(found)

    def _sync_endpoints(self, endpoints: list[str]) -> None:
        for ep in endpoints:
            if ep not in self.conns:
                self.conns[ep] = self._connect(ep)
                logger.info("worker %s added", ep)
        for ep in set(self.conns) - set(endpoints):
            conn = self.conns[ep]
            if not conn.removed:
                conn.removed = True  # e.g. its pod is terminating: let what it holds finish
                logger.info("worker %s left discovery; removing it once its calls are answered", ep)
        for ep in endpoints:
            self.conns[ep].removed = False

    def _connect(self, endpoint: str) -> WorkerConn:
        sock = make_socket(self._ctx, zmq.DEALER, connect=endpoint, socket_class=zmq.Socket, curve=self._curve)

        def on_message(frames: list[Any]) -> None:
            self._on_reply(conn, frames)

        conn = WorkerConn(endpoint, LoopSocket(sock, on_message))
        conn.io.start()
        conn.monitor = sock.get_monitor_socket(MONITORED)  # an asyncio socket: rare events
        conn.tasks = [asyncio.create_task(self._monitor_loop(conn, conn.monitor))]
        return conn

    def _remove(self, conn: WorkerConn) -> None:
        self._fail_pending(conn, "worker removed from the pool")
        for task in conn.tasks:
            task.cancel()
        # Closed here, not in the tasks' cleanup: Context.term() blocks until every socket is closed,
        # and it runs before cancelled tasks get to clean up.
        conn.io.sock.disable_monitor()
        if conn.monitor is not None:
            conn.monitor.close(linger=0)
        conn.io.close(linger=0)
        self.conns.pop(conn.endpoint, None)

    # -- heartbeats ----------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            now = time.monotonic()
            for conn in list(self.conns.values()):
                if conn.removed and not conn.pending:
                    self._remove(conn)
                    logger.info("worker %s removed", conn.endpoint)
                    continue
                # Pings sent and unanswered, not just wall-clock silence: if this event loop itself stalls
                # (GC, CPU starvation), no pings go out meanwhile and no worker is wrongly declared dead.
                silent = now - conn.last_seen > MISSED_HEARTBEATS * self.interval
                if conn.alive and silent and conn.unanswered >= MISSED_HEARTBEATS:
                    conn.alive = False
                    logger.warning("worker %s missed %d heartbeats; out of the pool", conn.endpoint, MISSED_HEARTBEATS)
                    self._fail_pending(conn, "worker stopped answering heartbeats")
                try:
                    _send_now(conn, protocol.request(Kind.PING, self._next_id()))
                    conn.unanswered += 1
                except zmq.Again:
                    pass  # not connected: it stays out until it answers
            metrics.WORKERS_READY.set(sum(c.alive for c in self.conns.values()))
            self._count_model_workers()
            await asyncio.sleep(self.interval)

    def _count_model_workers(self) -> None:
        """``tandem_model_workers``: live workers per known model (0 for a required model nobody serves);
        the series of a model no worker lists any more, and that is not required, is removed."""
        counts: Counter[str] = Counter()
        for c in self.conns.values():
            if c.routable():
                counts.update(m for m, state in c.models.items() if state.live)
        known = self.known_models()
        for model in known:
            metrics.MODEL_WORKERS.labels(model).set(counts[model])  # not metrics.child(): series get removed
        for gone in self._gauged - known:
            metrics.MODEL_WORKERS.remove(gone)
        self._gauged = known

    def _on_pong(self, conn: WorkerConn, header: dict[str, Any]) -> None:
        conn.apply_heartbeat(header)
        conn.last_seen = time.monotonic()
        if not conn.alive:
            logger.info("worker %s is alive", conn.endpoint)
        conn.alive = True

    def _on_reply(self, conn: WorkerConn, frames: list[Any]) -> None:
        try:
            replies = protocol.split(frames)
        except TandemError as exc:
            logger.warning("unparseable reply from %s: %s", conn.endpoint, exc)
            return
        for header, reply in replies:
            self._on_one_reply(conn, reply, header)

    def _on_one_reply(self, conn: WorkerConn, frames: Sequence[Any], header: dict[str, Any] | None) -> None:
        try:
            msg = protocol.parse_reply(frames, header)
        except TandemError as exc:
            logger.warning("unparseable reply from %s: %s", conn.endpoint, exc)
            # When the id got through, the caller learns now instead of waiting out its deadline.
            msg_id = protocol.protocol_error_id(exc) if isinstance(exc, ProtocolError) else None
            fut = conn.pending.pop(msg_id, None) if msg_id else None
            if fut is not None and not fut.done():
                fut.set_exception(ProtocolError(f"worker {conn.endpoint} sent an unreadable reply: {exc.message}"))
            return
        if "models" in msg.header and msg.header.get("status") == Status.OK and not msg.tensors:
            try:
                self._on_pong(conn, msg.header)
            except Exception:  # a malformed heartbeat must not end this worker's receive loop
                logger.exception("bad heartbeat from %s", conn.endpoint)
        conn.last_seen = msg.received = time.monotonic()
        conn.unanswered = 0
        fut = conn.pending.pop(msg.id, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)
        # else: a late answer to a call that already timed out or failed over; dropped.

    async def _monitor_loop(self, conn: WorkerConn, monitor: zmq.asyncio.Socket) -> None:
        """A dropped TCP connection (a killed worker) takes the worker out at once, not after three
        missed heartbeats, and its calls fail over while their budget still allows a retry."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                if conn.alive:
                    logger.warning("worker %s disconnected; out of the pool", conn.endpoint)
                conn.alive = False
                self._fail_pending(conn, "connection to the worker dropped")
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                conn.refused = False
            elif event["event"] in HANDSHAKE_FAILED:
                if not conn.refused:  # logged once until a handshake succeeds
                    logger.error("worker %s: %s; retrying", conn.endpoint, HANDSHAKE_FAILED[event["event"]])
                conn.refused = True
                if event["event"] != RETRIED_BY_ZMQ:
                    asyncio.get_running_loop().call_later(HANDSHAKE_RETRY_S, conn.reconnect)

    def _fail_pending(self, conn: WorkerConn, reason: str) -> None:
        pending, conn.pending = conn.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WorkerLost(f"{conn.endpoint}: {reason}"))

    # -- routing and calls ---------------------------------------------------------------------------

    def _next_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def candidates(self, model: str) -> list[WorkerConn]:
        """Workers a request for ``model`` may go to: alive, not draining, with a live version of it."""
        return [c for c in self.conns.values() if c.routable() and c.live(model)]

    def ready(self, model: str) -> bool:
        return bool(self.candidates(model))

    def listed_models(self) -> set[str]:
        """Models some worker in the pool lists in its last heartbeat, whether it is alive or not."""
        return {m for c in self.conns.values() if not c.removed for m in c.models}

    def known_models(self) -> set[str]:
        """Models this app server will route: those its settings name and those a worker lists."""
        return self.listed_models() | self.required

    def knows(self, model: str) -> bool:
        return model in self.required or any(model in c.models for c in self.conns.values() if not c.removed)

    def forget(self, conn: WorkerConn, model: str) -> None:
        """The worker answered that it does not serve ``model`` (it left its ``*`` set, say): route no
        more of it there until a heartbeat lists it again."""
        if conn.models.pop(model, None) is not None:
            logger.info("worker %s no longer serves %s", conn.endpoint, model)

    def pick(self, model: str, exclude: set[str] | frozenset[str] = frozenset()) -> WorkerConn:
        """A live worker serving ``model``: one where it is loaded if any (the others would load it
        first), then least outstanding requests (the model's queue there included); ties go to the
        worker answering fastest lately, so a slow worker gets less traffic even when load is too
        light for queues to form."""
        choices = [c for c in self.candidates(model) if c.endpoint not in exclude]
        if not choices:
            raise NoWorkers(f"no live worker serves model {model!r}")

        def key(c: WorkerConn) -> tuple[bool, int, float]:
            depth, wait_ms = c.load(model)
            return (not c.loaded(model), c.outstanding + depth, wait_ms + 1000 * c.rtt_ewma_s)

        return min(choices, key=key)

    async def call(
        self, conn: WorkerConn, frames: list[Any], msg_id: str, timeout_s: float, *, enveloped: bool = False
    ) -> protocol.Message:
        """Send one request and await its reply. ``enveloped``: leave at the end of this event-loop turn
        with the other requests to the same worker made meanwhile, in one envelope."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[protocol.Message] = loop.create_future()
        conn.pending[msg_id] = fut
        if enveloped:
            if not conn.outbox:
                loop.call_soon(self._flush, conn)
            conn.outbox.append((msg_id, frames))
        else:
            try:
                _send_now(conn, frames)
            except zmq.Again:
                conn.pending.pop(msg_id, None)
                raise WorkerLost(f"{conn.endpoint}: not connected") from None
        # A timer that fails the future itself: asyncio.wait_for would add a second future and two
        # callbacks per call, on the app server's hottest path.
        timer = loop.call_later(timeout_s, _expire, fut)
        try:
            return await fut
        except (TimeoutError, asyncio.CancelledError):
            # Nobody waits for this answer any more: let the worker drop it before it is batched.
            self.cancel(conn, msg_id)
            raise
        finally:
            timer.cancel()
            conn.pending.pop(msg_id, None)

    def _flush(self, conn: WorkerConn) -> None:
        """Send the requests queued this turn (those still awaited): one envelope, or the message itself."""
        queued, conn.outbox = conn.outbox, []
        live = [(i, frames) for i, frames in queued if (fut := conn.pending.get(i)) is not None and not fut.done()]
        if not live:
            return
        try:
            _send_now(conn, live[0][1] if len(live) == 1 else protocol.pack_batch([f for _, f in live]))
        except zmq.ZMQError as exc:  # zmq.Again: not connected (IMMEDIATE); the calls fail over
            reason = "not connected" if isinstance(exc, zmq.Again) else f"send failed: {exc}"
            for msg_id, _ in live:
                fut = conn.pending.get(msg_id)
                if fut is not None and not fut.done():
                    fut.set_exception(WorkerLost(f"{conn.endpoint}: {reason}"))

    async def infer(
        self,
        conn: WorkerConn,
        model: str,
        version: str,
        inputs: dict[str, Any],
        budget_s: float,
        request_id: str,
        *,
        priority: str | None = None,
    ) -> protocol.Message:
        """``priority="shadow"``: a mirrored copy, which the worker admits only with room to spare."""
        msg_id = self._next_id()
        frames = protocol.request(
            Kind.INFER,
            msg_id,
            model=model,
            version=version,
            # The worker's clock starts when the message arrives: leave it a little less than ours so
            # its deadline never falls after the moment this call gives up (transit, queueing here).
            budget_ms=budget_s * 1000 - min(TRANSIT_MARGIN_MS, budget_s * 100),
            inputs=inputs,
            request_id=request_id,
            batch_replies=True,
            **({"priority": priority} if priority else {}),
        )
        t0 = time.monotonic()
        try:
            return await self.call(conn, frames, msg_id, budget_s, enveloped=True)
        finally:
            rtt = time.monotonic() - t0
            conn.rtt_ewma_s = rtt if not conn.rtt_ewma_s else 0.8 * conn.rtt_ewma_s + 0.2 * rtt
            metrics.child(metrics.WORKER_RTT, model).observe(rtt)

    def cancel(self, conn: WorkerConn, msg_id: str) -> None:
        """Tell the worker to drop a queued request nobody waits for any more."""
        with contextlib.suppress(zmq.ZMQError):
            _send_now(conn, protocol.request(Kind.CANCEL, self._next_id(), target=msg_id))

    def described(self, model: str, version: str) -> dict[str, Any] | None:
        """What a worker described of ``model`` ``version`` so far (no I/O; any thread)."""
        return self._describe_cache.get((model, version))

    async def describe(self, conn: WorkerConn, model: str, version: str, timeout_s: float = 2.0) -> dict[str, Any]:
        """Feature spec, input example and signature of a version, cached per (model, version)."""
        key = (model, version)
        cached = self._describe_cache.get(key)
        if cached is not None:
            return cached
        msg_id = self._next_id()
        t0 = time.monotonic()
        try:
            reply = await self.call(
                conn, protocol.request(Kind.DESCRIBE, msg_id, model=model, version=version), msg_id, timeout_s
            )
        except TimeoutError:  # retryable elsewhere; a 503 with Retry-After where nobody retries
            raise WorkerLost(f"{conn.endpoint} did not describe {model} v{version} within {timeout_s:g} s") from None
        finally:
            note_worker_wait(time.monotonic() - t0)  # a worker's time, not this server's (admission)
        if reply.header.get("status") != Status.OK:
            raise from_wire(reply.header["status"], reply.header.get("message", ""))
        desc = reply.header["describe"]
        self._describe_cache[key] = desc
        return desc
