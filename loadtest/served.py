"""Served rows/s: what one worker answers when it is never short of work, over its own wire (ZeroMQ).

The HTTP bench measures a whole stack at one instance per request, which on a GPU says more about
HTTP parsing than about the worker. This is the worker alone against the engine ceiling: a closed loop
keeps ``window`` requests of ``rows_per_request`` rows in flight, so the batcher always has full batches
to form, and counts the rows answered ``ok`` per second after a warm-up. Every request, its rows and
its reply, goes through the path a real one takes (admission, batching, the executor, the runner's
device copies, the reply frames). Deadlines are generous and the queue bound is the worker's own: a
refusal is counted, never hidden.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from shared import protocol
from shared.protocol import Kind

if TYPE_CHECKING:
    from shared.curve import ClientKeys


def measure(
    endpoint: str,
    model: str,
    x: np.ndarray,
    *,
    window: int,
    seconds: float,
    warmup_s: float,
    budget_ms: float = 30_000.0,
    reply_timeout_s: float = 30.0,
    curve: ClientKeys | None = None,
) -> dict[str, Any]:
    """Closed loop on ``endpoint``: every request carries the rows of ``x``; ``window`` are in flight.
    ``curve``: the keys of a worker running with CURVE (``shared/curve.py``)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    ids = itertools.count()
    rows = x.shape[0]
    statuses: Counter[str] = Counter()
    devices: set[str] = set()

    def send() -> None:
        frames = protocol.request(Kind.INFER, f"s{next(ids)}", model=model, budget_ms=budget_ms, inputs={"input": x})
        sock.send_multipart(frames, copy=False)

    try:
        sock.send_multipart(protocol.request(Kind.PING, "ping"))
        if sock.poll(int(reply_timeout_s * 1000)):
            devices.add(str(protocol.parse_reply(sock.recv_multipart()).header.get("device")))
        for _ in range(window):
            send()
        start = time.perf_counter()
        measured_from = start + warmup_s
        end = measured_from + seconds
        ok_rows = answered = 0
        while (now := time.perf_counter()) < end:
            if not sock.poll(int(reply_timeout_s * 1000)):
                raise TimeoutError(f"no reply from {endpoint} within {reply_timeout_s} s")
            reply = protocol.parse_reply(sock.recv_multipart(copy=False))
            status = reply.header.get("status", "?")
            if now >= measured_from:
                statuses[status] += 1
                answered += 1
                ok_rows += rows if status == "ok" else 0
            send()
        elapsed = time.perf_counter() - measured_from
    finally:
        sock.close(0)
        ctx.term()
    return {
        "rows_per_s": round(ok_rows / elapsed, 1),
        "requests_per_s": round(answered / elapsed, 1),
        "rows_per_request": rows,
        "window": window,
        "seconds": round(elapsed, 2),
        "statuses": dict(statuses),
        "device": next(iter(devices), None),
    }
