"""``shared.transport.LoopSocket`` over real sockets: the edge-triggered descriptor's pitfall.

A ZeroMQ socket's descriptor signals changes, not waiting messages, and any ZeroMQ call can consume a
signal. A send made while a message is waiting unread must not leave that message unread forever.
"""

from __future__ import annotations

import asyncio
import time

import zmq

from shared.transport import LoopSocket, make_socket


async def _say_hello(io: LoopSocket, router: zmq.Socket) -> bytes:
    """The DEALER refuses sends until connected (IMMEDIATE): retry, then return its identity."""
    for _ in range(200):
        try:
            io.send([b"hello"])
            break
        except zmq.Again:
            await asyncio.sleep(0.01)
    ident, _ = router.recv_multipart()
    return ident


async def test_a_message_whose_signal_a_send_consumed_is_still_read():
    ctx = zmq.Context()
    router = make_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:*")
    dealer = make_socket(ctx, zmq.DEALER, connect=router.getsockopt_string(zmq.LAST_ENDPOINT))
    got: list[bytes] = []
    io = LoopSocket(dealer, lambda frames: got.append(frames[0].bytes))
    io.start()
    try:
        ident = await _say_hello(io, router)
        await asyncio.sleep(0.05)
        for i in range(3):
            router.send_multipart([ident, b"reply-%d" % i])
            time.sleep(0.05)  # arrived and signalled, and the loop has not run: nobody read it yet
            io.send([b"request-%d" % i])  # this send processes ZeroMQ's commands, consuming the signal
            for _ in range(50):
                await asyncio.sleep(0.01)
                if len(got) == i + 1:
                    break
            assert got == [b"reply-%d" % j for j in range(i + 1)]
    finally:
        io.close()
        router.close(0)
        ctx.term()


async def test_a_burst_larger_than_one_turn_is_read_in_full_and_in_order():
    ctx = zmq.Context()
    router = make_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:*")
    dealer = make_socket(ctx, zmq.DEALER, connect=router.getsockopt_string(zmq.LAST_ENDPOINT))
    got: list[int] = []
    bursts: list[int] = []
    io = LoopSocket(
        dealer, lambda frames: got.append(int(frames[0].bytes)), after_burst=lambda: bursts.append(len(got)), burst=10
    )
    io.start()
    try:
        ident = await _say_hello(io, router)
        for i in range(95):
            router.send_multipart([ident, b"%d" % i])
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(got) == 95:
                break
        assert got == list(range(95))
        assert len(bursts) >= 10 and all(b - a <= 10 for a, b in zip([0, *bursts[:-1]], bursts, strict=True))
    finally:
        io.close()
        router.close(0)
        ctx.term()
