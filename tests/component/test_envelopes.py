"""The app server's side of batch envelopes, against a hand-driven ROUTER standing in for a worker: the
requests made in one event-loop turn leave as one message, replies in an envelope reach every caller,
and a send that fails fails every call it carried over to the retry logic (none is left waiting)."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
import zmq
import zmq.asyncio

from app_server.workers import WorkerLost, WorkerPool
from shared import protocol
from shared.errors import ProtocolError
from shared.protocol import Kind, Status
from shared.settings import AppSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _connected(pool: WorkerPool, fake: zmq.asyncio.Socket) -> None:
    """Until a ping gets through (IMMEDIATE refuses sends before the connection is up)."""
    for _ in range(100):
        if await fake.poll(50):
            await fake.recv_multipart()  # the pool's first heartbeat
            return
    raise AssertionError("pool never connected")


@pytest.fixture
async def pool_and_worker():
    port = _free_port()
    ctx = zmq.asyncio.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.bind(f"tcp://127.0.0.1:{port}")
    pool = WorkerPool(AppSettings(worker_urls=f"tcp://127.0.0.1:{port}", heartbeat_interval=0.05))
    await pool.start()
    await _connected(pool, fake)
    yield pool, pool.conns[f"tcp://127.0.0.1:{port}"], fake
    await pool.close()
    fake.close(0)
    ctx.term()


async def _next_infer(fake: zmq.asyncio.Socket) -> tuple[bytes, list]:
    """The next message that is not a heartbeat, as ``(identity, [(header, frames), ...])``."""
    while True:
        ident, *frames = await asyncio.wait_for(fake.recv_multipart(), 5)
        parts = protocol.split(frames)
        if any(h and h.get("kind") == "infer" for h, _ in parts):
            return ident, parts


async def test_requests_made_in_one_turn_leave_in_one_envelope_and_replies_come_back_enveloped(pool_and_worker):
    pool, conn, fake = pool_and_worker
    x = np.ones((1, 4), np.float32)
    calls = [asyncio.ensure_future(pool.infer(conn, "demo", "1", {"input": x * i}, 5.0, f"r{i}")) for i in range(5)]
    ident, parts = await _next_infer(fake)
    assert len(parts) == 5  # one ZeroMQ message for all five
    requests = [protocol.parse_request(frames, header) for header, frames in parts]
    assert all(r.header["batch_replies"] is True for r in requests)
    assert [r.header["request_id"] for r in requests] == [f"r{i}" for i in range(5)]
    replies = [
        protocol.reply(r.id, Status.OK, version="1", outputs={"p": r.tensors["input"][:, :1] * 10}) for r in requests
    ]
    await fake.send_multipart([ident, *protocol.pack_batch(replies[:3])])  # an envelope...
    for reply in replies[3:]:
        await fake.send_multipart([ident, *reply])  # ...and single messages, in any mix
    answers = await asyncio.gather(*calls)
    assert [float(a.tensors["p"][0, 0]) for a in answers] == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert not conn.pending


async def test_a_request_alone_in_its_turn_is_sent_as_itself(pool_and_worker):
    pool, conn, fake = pool_and_worker
    call = asyncio.ensure_future(pool.infer(conn, "demo", "1", {"input": np.ones((1, 2), np.float32)}, 5.0, "solo"))
    ident, [(header, frames)] = await _next_infer(fake)
    request = protocol.parse_request(frames, header)
    assert request.header["request_id"] == "solo"
    await fake.send_multipart([ident, *protocol.reply(request.id, Status.OK, version="1")])
    assert (await call).header["status"] == "ok"


async def test_a_call_cancelled_before_its_turn_ends_is_never_sent(pool_and_worker):
    pool, conn, fake = pool_and_worker
    x = np.ones((1, 2), np.float32)
    kept = asyncio.ensure_future(pool.infer(conn, "demo", "1", {"input": x}, 5.0, "kept"))
    dropped = asyncio.ensure_future(pool.infer(conn, "demo", "1", {"input": x}, 5.0, "dropped"))
    await asyncio.sleep(0)  # both queued in this turn's outbox
    dropped.cancel()
    _, parts = await _next_infer(fake)
    assert [protocol.parse_request(f, h).header["request_id"] for h, f in parts] == ["kept"]
    kept.cancel()


async def test_a_failed_send_fails_every_call_it_carried(pool_and_worker):
    pool, conn, fake = pool_and_worker
    fake.close(0)  # the worker is gone: once ZeroMQ notices, IMMEDIATE makes every send fail at once
    for _ in range(250):
        await asyncio.sleep(0.02)
        try:
            conn.io.sock.send_multipart(protocol.request(Kind.PING, "probe"), zmq.NOBLOCK)
        except zmq.Again:
            break
    else:
        raise AssertionError("the connection never dropped")
    x = np.ones((1, 2), np.float32)
    calls = [asyncio.ensure_future(pool.infer(conn, "demo", "1", {"input": x}, 5.0, f"f{i}")) for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 2)
    assert all(isinstance(r, WorkerLost) for r in results), results
    assert not conn.pending


async def test_an_unreadable_reply_fails_its_call_at_once_instead_of_at_its_deadline(pool_and_worker):
    pool, conn, fake = pool_and_worker
    x = np.ones((1, 2), np.float32)
    call = asyncio.ensure_future(pool.infer(conn, "demo", "1", {"input": x}, 5.0, "r"))
    ident, [(header, _)] = await _next_infer(fake)
    reply = protocol.reply(header["id"], Status.OK, version="1", outputs={"probability": np.zeros((1, 1), np.float32)})
    t0 = time.monotonic()
    await fake.send_multipart([ident, reply[0], b"\x00\x00"])  # 2 bytes where the header describes 4
    with pytest.raises(ProtocolError, match="unreadable reply"):
        await asyncio.wait_for(call, 2)
    assert time.monotonic() - t0 < 1.0 and not conn.pending


async def test_a_describe_the_worker_never_answers_is_a_retryable_error(pool_and_worker):
    pool, conn, _ = pool_and_worker
    t0 = time.monotonic()
    with pytest.raises(WorkerLost, match="did not describe") as exc:
        await pool.describe(conn, "demo", "1", timeout_s=0.2)
    assert time.monotonic() - t0 < 1.0
    assert exc.value.http_status == 503 and exc.value.retry_after_s
    assert not conn.pending


async def _answer_next_ping(fake: zmq.asyncio.Socket, **fields) -> None:
    while True:
        ident, *frames = await asyncio.wait_for(fake.recv_multipart(), 5)
        for header, _ in protocol.split(frames):
            if header and header.get("kind") == "ping":
                await fake.send_multipart([ident, *protocol.reply(header["id"], Status.OK, **fields)])
                return


async def test_a_malformed_heartbeat_changes_nothing_and_a_good_one_is_taken(pool_and_worker):
    _, conn, fake = pool_and_worker
    assert not conn.alive
    await _answer_next_ping(fake, models={"demo": 5}, queue_depth=0)  # "5" is not {"live": ..., "resident": [...]}
    await asyncio.sleep(0.2)
    assert not conn.alive and conn.models == {}
    await _answer_next_ping(fake, models={"demo": {"live": "3", "resident": ["3"]}}, queue_depth=2)
    for _ in range(50):
        if conn.alive:
            break
        await asyncio.sleep(0.02)
    assert conn.alive and conn.live("demo") == "3" and conn.queue_depth == 2
