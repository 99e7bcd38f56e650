"""One helper makes every ZeroMQ socket, so socket options are decided in one place.

High-water marks bound memory on both sides; ``linger=0`` keeps shutdown from hanging on unsent
messages; ``IMMEDIATE`` makes a DEALER refuse to queue for a peer that is not connected, so a request
is never parked for a dead worker and delivered much later with a stale budget.
"""

from __future__ import annotations

import zmq

HWM = 10_000


def make_socket(
    ctx: zmq.Context, kind: int, *, bind: str | None = None, connect: str | None = None, hwm: int = HWM
) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if kind == zmq.DEALER:
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if bind:
        sock.bind(bind)
    if connect:
        sock.connect(connect)
    return sock
