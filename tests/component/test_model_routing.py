"""Routing by model against scripted workers over real ZeroMQ: the heartbeat contract's per-model fields
(``loaded``, ``queue_depth``) steer the choice of worker, and the replies of a worker that no longer
serves a model (``model_not_found``) or has to load it first (``model_loading``) are retried elsewhere
or answered 404 / 503 as the contract says. Today's workers send none of these; the fakes do."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from app_server import metrics
from app_server.catalog import ModelCatalog
from app_server.failover import Dispatcher, Prepared
from app_server.worker_conn import WorkerConn
from app_server.workers import WorkerPool
from shared import protocol
from shared.errors import ModelError, ModelLoading, ModelNotFound, NoWorkers
from shared.protocol import Kind, Status
from shared.settings import AppSettings

Answer = Callable[[protocol.Message], list[Any]]


def ok(request: protocol.Message) -> list[Any]:
    x = request.tensors["input"]
    out = {"probability": x[:, :1].copy()}
    version, model = request.header["version"], request.header["model"]
    return protocol.reply(request.id, Status.OK, version=version, outputs=out, model=model)


class FakeWorker:
    """A ROUTER answering heartbeats with ``models`` and inference requests with ``answer``."""

    def __init__(self, ctx: zmq.asyncio.Context, models: dict[str, Any], answer: Answer = ok) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.bind(self.endpoint)
        self.models = models
        self.answer = answer
        self.queue_depth = 0
        """Worker-wide queue depth in its heartbeats."""
        self.served: list[str] = []
        """Model named by each inference request received."""
        self.task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        while True:
            ident, *frames = await self.sock.recv_multipart()
            for header, part in protocol.split(frames):
                request = protocol.parse_request(part, header)
                if request.header["kind"] == Kind.PING:
                    reply = protocol.reply(request.id, Status.OK, models=self.models, queue_depth=self.queue_depth)
                elif request.header["kind"] == Kind.INFER:
                    self.served.append(request.header["model"])
                    reply = self.answer(request)
                else:
                    continue
                await self.sock.send_multipart([ident, *reply])

    def close(self) -> None:
        self.task.cancel()
        self.sock.close(0)


def serving(**extra: Any) -> dict[str, Any]:
    return {"live": "1", "resident": ["1"], **extra}


@pytest.fixture
async def fleet() -> AsyncIterator[Callable[..., Any]]:
    """``await make(settings_kw, *workers)``: a started pool (and its dispatcher) over fake workers."""
    ctx = zmq.asyncio.Context()
    made: list[Any] = []

    async def make(models: str | None, *workers: tuple[dict[str, Any], Answer]) -> tuple[Dispatcher, list[FakeWorker]]:
        fakes = [FakeWorker(ctx, m, a) for m, a in workers]
        settings = AppSettings(
            worker_urls=",".join(f.endpoint for f in fakes), heartbeat_interval=0.05, models=models, model=None
        )
        pool = WorkerPool(settings)
        await pool.start()
        made.append((pool, fakes))
        deadline = time.monotonic() + 5
        while not all(c.alive for c in pool.conns.values()):
            assert time.monotonic() < deadline, "fake workers never answered a heartbeat"
            await asyncio.sleep(0.02)
        return Dispatcher(settings, pool), fakes

    yield make
    for pool, fakes in made:
        await pool.close()
        for f in fakes:
            f.close()
    ctx.term()


async def send(dispatcher: Dispatcher, model: str, version: str | None = None) -> protocol.Message:
    async def prepare(conn: WorkerConn, version: str) -> Prepared:
        return Prepared(version, np.ones((1, 3), np.float32), "input", "probability")

    reply, _ = await dispatcher.infer(model, prepare, "rid", time.monotonic() + 2, version)
    assert reply is not None
    return reply


def retries(reason: str, model: str) -> float:
    return metrics.RETRIES.labels(reason, model)._value.get()


def not_found(request: protocol.Message) -> list[Any]:
    return protocol.reply(request.id, Status.MODEL_NOT_FOUND, message="not served here")


def loading(request: protocol.Message) -> list[Any]:
    return protocol.reply(request.id, Status.MODEL_LOADING, message="loading", retry_after_ms=2500)


async def test_requests_go_only_to_workers_serving_their_model(fleet):
    dispatcher, (a, b) = await fleet(None, ({"m": serving()}, ok), ({"n": serving()}, ok))
    for model in ("m", "n", "m"):
        assert (await send(dispatcher, model)).header["status"] == "ok"
    assert a.served == ["m", "m"] and b.served == ["n"]
    with pytest.raises(ModelNotFound):
        await send(dispatcher, "elsewhere")


async def test_a_worker_that_no_longer_serves_the_model_is_skipped_and_forgotten(fleet):
    dispatcher, (leaving, staying) = await fleet(
        None, ({"m": serving(queue_depth=0)}, not_found), ({"m": serving(queue_depth=5)}, ok)
    )
    # The leaving worker is picked first by the model's own queue, though its worker-wide queue is longer.
    leaving.queue_depth = 50
    await asyncio.sleep(0.15)
    before = retries("model_not_found", "m")
    assert (await send(dispatcher, "m")).header["status"] == "ok"
    assert leaving.served == ["m"] and staying.served == ["m"]
    assert retries("model_not_found", "m") == before + 1
    assert leaving.endpoint not in {c.endpoint for c in dispatcher.pool.candidates("m")}  # until it lists m again


@pytest.mark.parametrize(("required", "expected"), [(None, ModelNotFound), ("m", NoWorkers)])
async def test_when_the_last_worker_drops_the_model_it_is_404_unless_the_settings_name_it(fleet, required, expected):
    dispatcher, _ = await fleet(required, ({"m": serving()}, not_found))
    with pytest.raises(expected):
        await send(dispatcher, "m")


async def test_workers_where_the_model_is_loaded_are_preferred_and_loading_is_retried_or_503(fleet):
    dispatcher, (unloaded, busy) = await fleet(
        None, ({"m": serving(loaded=False, queue_depth=0)}, loading), ({"m": serving(queue_depth=9)}, ok)
    )
    assert (await send(dispatcher, "m")).header["status"] == "ok"
    assert unloaded.served == [] and busy.served == ["m"]

    dispatcher, (stale, other) = await fleet(None, ({"m": serving()}, loading), ({"m": serving(queue_depth=9)}, ok))
    before = retries("model_loading", "m")
    assert (await send(dispatcher, "m")).header["status"] == "ok"
    assert stale.served == ["m"] and other.served == ["m"] and retries("model_loading", "m") == before + 1

    # Unloaded, the model lists no resident version, yet its live version is still served there.
    dispatcher, (only,) = await fleet(None, ({"m": serving(loaded=False, resident=[])}, loading))
    with pytest.raises(ModelLoading) as exc:
        await send(dispatcher, "m", version="1")
    assert exc.value.http_status == 503 and exc.value.retry_after_s == 2.5 and only.served == ["m"]
    catalog = ModelCatalog(dispatcher.settings, dispatcher.pool)
    assert catalog.holders("m", "1") and catalog.newest("m") == "1"


async def test_an_answer_for_another_model_is_an_error_not_a_prediction(fleet):
    def wrong(request: protocol.Message) -> list[Any]:
        return protocol.reply(request.id, Status.OK, version="1", model="n", outputs={"probability": np.zeros((1, 1))})

    dispatcher, _ = await fleet(None, ({"m": serving()}, wrong))
    with pytest.raises(ModelError, match="answered for model 'n'"):
        await send(dispatcher, "m")


async def test_model_workers_gauge_follows_heartbeats_and_drops_models_nobody_lists(fleet):
    dispatcher, (a, _) = await fleet("r", ({"m": serving(), "gone": serving()}, ok), ({"m": serving()}, ok))
    pool = dispatcher.pool

    def gauge() -> dict[str, float]:
        (family,) = [f for f in metrics.MODEL_WORKERS.collect()]
        return {s.labels["model"]: s.value for s in family.samples}

    await asyncio.sleep(0.15)
    assert {k: v for k, v in gauge().items() if k in ("m", "gone", "r")} == {"m": 2, "gone": 1, "r": 0}
    assert ModelCatalog(dispatcher.settings, pool).live_workers() == 2  # workers, not (worker, model) pairs
    a.models = {"m": serving()}  # the worker stops serving "gone"
    await asyncio.sleep(0.2)
    assert "gone" not in gauge() and gauge()["m"] == 2 and gauge()["r"] == 0
    assert sorted(pool.known_models()) == ["m", "r"]
