"""Worker discovery through DNS (a Kubernetes headless Service): workers join and leave without a
restart, and a worker that leaves is removed only once the calls it holds are answered."""

from __future__ import annotations

import asyncio
import socket

import pytest
import zmq

from app_server.workers import WorkerPool
from shared.settings import AppSettings


@pytest.fixture
def peers():
    """Live ZeroMQ peers on three loopback addresses, one port: what a headless Service's pods look like."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = zmq.Context()
    socks = []
    for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(f"tcp://{ip}:{port}")
        socks.append(sock)
    yield port
    for sock in socks:
        sock.close(0)
    ctx.term()


@pytest.fixture
def dns(monkeypatch, peers):
    """A resolver whose answer for ``workers.test`` the test controls."""
    records: dict[str, list[str]] = {"workers.test": ["127.0.0.1", "127.0.0.2"]}
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host in records:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in records[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return records


async def test_dns_endpoints_are_added_and_removed_without_a_restart(dns, peers):
    port = peers
    pool = WorkerPool(
        AppSettings(worker_urls=f"dns+tcp://workers.test:{port}", dns_refresh_s=0.05, heartbeat_interval=0.05)
    )
    await pool.start()
    try:
        assert sorted(pool.conns) == [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.2:{port}"]
        dns["workers.test"] = ["127.0.0.2", "127.0.0.3"]
        await asyncio.sleep(0.3)
        assert sorted(pool.conns) == [f"tcp://127.0.0.2:{port}", f"tcp://127.0.0.3:{port}"]
        # A failed lookup (e.g. DNS briefly down) never empties the pool.
        dns["workers.test"] = []
        await asyncio.sleep(0.3)
        assert sorted(pool.conns) == [f"tcp://127.0.0.2:{port}", f"tcp://127.0.0.3:{port}"]
    finally:
        await pool.close()


async def test_a_worker_leaving_dns_keeps_its_calls_until_they_are_answered(dns, peers):
    port = peers
    pool = WorkerPool(
        AppSettings(worker_urls=f"dns+tcp://workers.test:{port}", dns_refresh_s=0.05, heartbeat_interval=0.05)
    )
    await pool.start()
    try:
        leaving = pool.conns[f"tcp://127.0.0.1:{port}"]
        held = asyncio.get_running_loop().create_future()
        leaving.pending["call-1"] = held  # a call in flight to the leaving worker
        dns["workers.test"] = ["127.0.0.2"]
        await asyncio.sleep(0.3)
        assert leaving.removed and f"tcp://127.0.0.1:{port}" in pool.conns  # not routable, still open
        assert not held.done()
        leaving.pending.pop("call-1")
        held.cancel()
        await asyncio.sleep(0.3)
        assert f"tcp://127.0.0.1:{port}" not in pool.conns
    finally:
        await pool.close()
