"""A worker server run in the test's own event loop, with a DEALER client connected to it: the way
component tests talk to a worker over real ZeroMQ sockets without starting a process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from ml_worker.server import WorkerServer
from shared import protocol


@contextlib.asynccontextmanager
async def running(server: WorkerServer, *, watch: bool) -> AsyncIterator[tuple[WorkerServer, zmq.asyncio.Socket]]:
    """``server`` serving (following the registry when ``watch``), and a client; both closed after."""
    task = asyncio.create_task(server.serve(watch=watch))
    ctx = zmq.asyncio.Context()
    client = ctx.socket(zmq.DEALER)
    client.connect(server.endpoint)
    try:
        yield server, client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        client.close(0)
        ctx.term()


async def ask(client: zmq.asyncio.Socket, frames: list, timeout: float = 10.0) -> protocol.Message:
    await client.send_multipart(frames)
    return protocol.parse_reply(await asyncio.wait_for(client.recv_multipart(), timeout))
