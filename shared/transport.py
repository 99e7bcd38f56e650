"""One helper makes every ZeroMQ socket, so socket options are decided in one place.

High-water marks bound memory on both sides; ``linger=0`` keeps shutdown from hanging on unsent
messages; ``IMMEDIATE`` makes a DEALER refuse to queue for a peer that is not connected, so a request
is never parked for a dead worker and delivered much later with a stale budget. CURVE keys, when
given, are set before the socket binds or connects (``shared/curve.py``): a socket is never open first
and secured later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

if TYPE_CHECKING:
    from shared.curve import ClientKeys, ServerKeys

logger = logging.getLogger(__name__)

HWM = 10_000
_POLLIN = int(zmq.POLLIN)  # a plain int: ``zmq.POLLIN`` is an enum flag, whose ``&`` runs Python code


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    hwm: int = HWM,
    socket_class: type[zmq.Socket] | None = None,
    curve: ServerKeys | ClientKeys | None = None,
) -> zmq.Socket:
    sock = ctx.socket(kind, socket_class=socket_class) if socket_class else ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if kind == zmq.DEALER:
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if curve is not None:
        curve.apply(sock)
    if bind:
        sock.bind(bind)
    if connect:
        sock.connect(connect)
    return sock


class LoopSocket:
    """A plain ZeroMQ socket driven by an asyncio loop, without pyzmq's per-message futures.

    pyzmq's asyncio sockets make a future for every send and receive and re-read ``ZMQ_EVENTS`` around
    each; at thousands of messages per second that bookkeeping was a measurable share of both tiers'
    CPU. Here a reader callback on the socket's file descriptor drains every waiting message (a burst at
    a time), and sends are non-blocking calls. The descriptor is edge-triggered: it signals changes, not
    waiting messages, and any ZeroMQ call may consume a signal. So after every send ``ZMQ_EVENTS`` is read
    once, and messages that arrived meanwhile are drained on the next loop turn rather than waiting for a
    signal that already went.
    """

    def __init__(
        self,
        sock: zmq.Socket,
        on_message: Callable[[list[Any]], None],
        *,
        after_burst: Callable[[], None] | None = None,
        burst: int = 256,
    ) -> None:
        self.sock = sock
        self._on_message = on_message
        self._after_burst = after_burst
        self._burst = burst
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.FD, self._drain)
        self._schedule()  # whatever arrived before the reader was added

    def stop(self) -> None:
        if self._loop is not None and not self.sock.closed:
            self._loop.remove_reader(self.sock.FD)
        self._loop = None

    def close(self, linger: int = 0) -> None:
        self.stop()
        self.sock.close(linger=linger)

    def send(self, frames: Sequence[Any]) -> None:
        """Send now or raise (``zmq.Again``: a DEALER with no connected peer, or a full queue)."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        finally:  # a failed send may have consumed the descriptor's signal too
            if not self.sock.closed and self.sock.getsockopt(zmq.EVENTS) & _POLLIN:
                self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._loop is None or self.sock.closed:
            return
        for _ in range(self._burst):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                self._on_message(frames)
            except Exception:  # one bad message must not stop the socket's reader
                logger.exception("unhandled error handling a message")
            if self._loop is None:  # the handler closed the socket
                return
        else:
            self._schedule()  # more may be waiting: go on after others had a turn
        if self._after_burst is not None:
            self._after_burst()
