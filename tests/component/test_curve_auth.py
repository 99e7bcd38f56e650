"""CURVE between the tiers, in-process over real sockets: a worker answers only clients holding an
authorised key, counts the others, and follows its authorised directory without a restart; an app
server's pool gets in with its key, also once its key is authorised after it started."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

from app_server.workers import WorkerPool
from ml_worker import auth
from ml_worker.server import WorkerServer
from shared import curve, protocol
from shared.curve import KeyPair
from shared.protocol import Kind
from shared.settings import AppSettings, WorkerSettings


@dataclass
class Keys:
    dir: Path
    authorized: Path
    worker: KeyPair
    app: KeyPair

    def pair(self, name: str) -> KeyPair:
        """A new pair, not authorised."""
        _, secret = curve.generate_pair(self.dir, name)
        return curve.read_pair(secret)

    def authorise(self, name: str) -> None:
        shutil.copy(self.dir / f"{name}.key", self.authorized / f"{name}.key")


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    made, authorized = tmp_path / "made", tmp_path / "authorized"
    authorized.mkdir()
    k = Keys(made, authorized, curve.read_pair(curve.generate_pair(made, "worker")[1]), KeyPair(b"", b"", path=made))
    k.app = k.pair("app")
    k.authorise("app")
    return k


@contextlib.asynccontextmanager
async def guarded_worker(keys: Keys, tmp_path: Path) -> AsyncIterator[WorkerServer]:
    settings = WorkerSettings(
        bind="tcp://127.0.0.1:*",
        home=tmp_path,
        curve_secret_key=keys.worker.path,
        curve_authorized_dir=keys.authorized,
    )
    server = WorkerServer(settings)
    task = asyncio.create_task(server.serve(watch=False))
    try:
        yield server
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def client(endpoint: str, pair: KeyPair | None = None, server_key: bytes | None = None):
    """A raw DEALER, with CURVE keys when ``pair`` is given."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if pair is not None:
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = pair.secret, pair.public, server_key
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(0)
        ctx.term()


async def answered(sock: zmq.asyncio.Socket, within_s: float = 1.0) -> bool:
    await sock.send_multipart(protocol.request(Kind.PING, "p"))
    try:
        reply = protocol.parse_reply(await asyncio.wait_for(sock.recv_multipart(), within_s))
    except TimeoutError:
        return False
    return reply.header["status"] == "ok"


async def admitted(server: WorkerServer, pair: KeyPair, keys: Keys) -> bool:
    with client(server.endpoint, pair, keys.worker.public) as sock:
        return await answered(sock)


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("tandem_worker_auth_failures_total", {"reason": reason}) or 0.0


async def eventually(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_only_an_authorised_key_gets_an_answer(keys: Keys, tmp_path: Path) -> None:
    before = {r: failures(r) for r in ("handshake", "unauthorized")}
    intruder = keys.pair("intruder")
    async with guarded_worker(keys, tmp_path) as server:
        with (
            client(server.endpoint, keys.app, keys.worker.public) as good,
            client(server.endpoint) as no_key,
            client(server.endpoint, intruder, keys.worker.public) as wrong_key,
            client(server.endpoint, keys.app, keys.app.public) as wrong_worker_key,
        ):
            results = await asyncio.gather(*(answered(s) for s in (good, no_key, wrong_key, wrong_worker_key)))
            assert results == [True, False, False, False]
            # The no-key client and the one with the wrong worker key fail the handshake; the intruder's key
            # is refused by ZAP. (libzmq retries the wrong-worker-key client: one or more each.)
            await eventually(lambda: failures("unauthorized") >= before["unauthorized"] + 1)
            await eventually(lambda: failures("handshake") >= before["handshake"] + 2)


async def test_keys_rotate_without_a_restart(keys: Keys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(auth, "RELOAD_S", 0.05)
    revoked = failures("revoked")
    new = keys.pair("app-next")
    async with guarded_worker(keys, tmp_path) as server:
        with client(server.endpoint, keys.app, keys.worker.public) as old_conn:
            assert await answered(old_conn)
            assert not await admitted(server, new, keys)

            keys.authorise("app-next")  # the new key is admitted...
            await asyncio.sleep(0.2)
            assert await admitted(server, new, keys)

            (keys.authorized / "app.key").unlink()  # ...and the old one dropped
            await asyncio.sleep(0.2)
            assert not await admitted(server, keys.app, keys)
            assert not await answered(old_conn, 0.5), "a connection made with a removed key keeps no access"
            assert failures("revoked") > revoked


async def test_a_bad_key_file_after_start_narrows_access_only(keys: Keys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(auth, "RELOAD_S", 0.05)
    async with guarded_worker(keys, tmp_path) as server:
        (keys.authorized / "app.key").write_text("garbage\n")
        await asyncio.sleep(0.2)
        assert not await admitted(server, keys.app, keys)  # unreadable now: not admitted, and the worker runs
        keys.authorise("app")
        await asyncio.sleep(0.2)
        assert await admitted(server, keys.app, keys)


async def test_app_pool_gets_in_once_its_key_is_authorised(keys: Keys, tmp_path: Path, monkeypatch) -> None:
    """libzmq gives up on a refused handshake; the pool connects again, so authorising the app's key
    after it started is enough."""
    monkeypatch.setattr(auth, "RELOAD_S", 0.05)
    monkeypatch.setattr("app_server.workers.HANDSHAKE_RETRY_S", 0.1)
    late = keys.pair("late")
    async with guarded_worker(keys, tmp_path) as server:
        settings = AppSettings(
            worker_urls=server.endpoint,
            heartbeat_interval=0.05,
            curve_secret_key=late.path,
            curve_worker_key=keys.dir / "worker.key",
        )
        pool = WorkerPool(settings)
        await pool.start()
        try:
            conn = pool.conns[server.endpoint]
            await asyncio.sleep(0.5)
            assert not conn.alive and conn.refused
            keys.authorise("late")
            await eventually(lambda: conn.alive, 3.0)
            assert not conn.refused
        finally:
            await pool.close()


async def test_plain_app_pool_is_not_let_into_a_curve_worker(keys: Keys, tmp_path: Path) -> None:
    async with guarded_worker(keys, tmp_path) as server:
        pool = WorkerPool(AppSettings(worker_urls=server.endpoint, heartbeat_interval=0.05))
        await pool.start()
        try:
            await asyncio.sleep(0.5)
            assert not pool.conns[server.endpoint].alive
        finally:
            await pool.close()
