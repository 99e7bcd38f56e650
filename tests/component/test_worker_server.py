"""The worker's ZeroMQ server in-process, over real sockets: answers, refusals, garbage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from worker_harness import ask, running

from ml_worker import versions
from ml_worker.batcher import Poll, SimpleBatcher
from ml_worker.server import WorkerServer, make_batcher
from ml_worker.slots import ModelSlot
from ml_worker.versions import load_version
from shared import protocol, registry
from shared.model_targets import ModelTarget
from shared.protocol import Kind
from shared.settings import WorkerSettings


@pytest.fixture(scope="module")
def model_dir(demo_registry, tmp_path_factory) -> Path:
    return registry.download(demo_registry.uri, demo_registry.version, tmp_path_factory.mktemp("cache"))


@contextlib.asynccontextmanager
async def serving(model_dir: Path, registry_uri: str, batcher=None, **overrides):
    settings = WorkerSettings(bind="tcp://127.0.0.1:*", registry_uri=registry_uri, **overrides)
    slot = ModelSlot(ModelTarget("demo"), batcher or make_batcher(settings, "demo"))
    slot.swap(load_version("demo", "1", model_dir), time.monotonic())
    async with running(WorkerServer(settings, slots=[slot]), watch=False) as served:
        yield served


def example_rows(model_dir: Path) -> tuple[np.ndarray, list[float]]:
    from shared.features import load_spec

    example = registry.read_input_example(model_dir)
    spec = load_spec(registry.model_files(model_dir)["feature_spec"].read_text())
    return spec.encoder.encode(example["instances"]), example["predictions"]


async def test_infer_ping_and_describe(model_dir, demo_registry):
    x, expected = example_rows(model_dir)
    async with serving(model_dir, demo_registry.uri) as (_, client):
        pong = await ask(client, protocol.request(Kind.PING, "p1"))
        assert pong.header["status"] == "ok"
        (model,) = pong.header["models"].items()
        assert model[0] == "demo"
        assert {k: model[1][k] for k in ("live", "resident", "loaded", "queue_depth")} == {
            "live": "1",
            "resident": ["1"],
            "loaded": True,
            "queue_depth": 0,
        }
        assert pong.header["device"] == "cpu"
        reply = await ask(
            client, protocol.request(Kind.INFER, "i1", model="demo", version="1", budget_ms=1000, inputs={"input": x})
        )
        assert reply.id == "i1" and reply.header["status"] == "ok" and reply.header["version"] == "1"
        np.testing.assert_allclose(reply.tensors["probability"][:, 0], expected, rtol=1e-5)
        assert reply.header["timing"]["batch_size"] == len(expected)
        desc = await ask(client, protocol.request(Kind.DESCRIBE, "d1", model="demo", version="1"))
        assert desc.header["describe"]["feature_spec"]["entity"] == "account"
        assert desc.header["describe"]["input_example"]


WIDTH = 35  # the demo model's encoded width


def _infer_header(shape=(1, WIDTH), **fields):
    return {
        "v": 1,
        "kind": "infer",
        "id": "g1",
        "budget_ms": 100,
        "version": "1",
        "inputs": [{"name": "input", "dtype": "float32", "shape": list(shape)}],
        **fields,
    }


@pytest.mark.parametrize(
    "frames",
    [
        [b"not msgpack at all \xc1"],
        [msgpack.packb({"v": 99, "kind": "infer", "id": "g1"})],
        [
            msgpack.packb(
                {
                    "v": 1,
                    "kind": "infer",
                    "id": "g1",
                    "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 1000]}],
                }
            ),
            b"\x00" * 8,
        ],
        [
            msgpack.packb(
                {
                    "v": 1,
                    "kind": "infer",
                    "id": "g1",
                    "budget_ms": 100,
                    "version": "1",
                    "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 3]}],
                }
            ),
            b"\x00" * 12,
        ],
        [
            msgpack.packb(
                {
                    "v": 1,
                    "kind": "infer",
                    "id": "g1",
                    "budget_ms": 100,
                    "version": "1",
                    "inputs": [{"name": "wrong", "dtype": "float32", "shape": [1, 1]}],
                }
            ),
            b"\x00" * 4,
        ],
        # Zero rows: once crashed the batcher (and with it the worker).
        [msgpack.packb(_infer_header(shape=[0, WIDTH])), b""],
        # Budgets that are not numbers.
        [msgpack.packb(_infer_header(budget_ms="abc")), b"\x00" * 4 * WIDTH],
        [msgpack.packb(_infer_header(budget_ms=float("nan"))), b"\x00" * 4 * WIDTH],
        [msgpack.packb(_infer_header(budget_ms=[1])), b"\x00" * 4 * WIDTH],
    ],
)
async def test_garbage_gets_bad_request_and_the_worker_keeps_serving(model_dir, demo_registry, frames):
    x, _ = example_rows(model_dir)
    async with serving(model_dir, demo_registry.uri) as (_, client):
        await client.send_multipart(frames)
        bad = protocol.parse_reply(await asyncio.wait_for(client.recv_multipart(), 5))
        assert bad.header["status"] == "bad_request"
        assert bad.header["message"]
        good = await ask(
            client, protocol.request(Kind.INFER, "ok", model="demo", version="1", budget_ms=1000, inputs={"input": x})
        )
        assert good.header["status"] == "ok"


async def test_unknown_version_and_spent_budget_are_refused(model_dir, demo_registry):
    x, _ = example_rows(model_dir)
    async with serving(model_dir, demo_registry.uri) as (_, client):
        r = await ask(
            client, protocol.request(Kind.INFER, "v", model="demo", version="7", budget_ms=1000, inputs={"input": x})
        )
        assert r.header["status"] == "version_unavailable"
        assert r.header["version"] == "1"  # tells the app what it holds instead
        r = await ask(
            client, protocol.request(Kind.INFER, "b", model="demo", version="1", budget_ms=0, inputs={"input": x})
        )
        assert r.header["status"] == "deadline_exceeded"


async def test_concurrent_requests_are_batched_and_each_gets_its_rows(model_dir, demo_registry):
    x, expected = example_rows(model_dir)
    async with serving(model_dir, demo_registry.uri, max_batch_size=64) as (_, client):
        for i in range(40):
            await client.send_multipart(
                protocol.request(
                    Kind.INFER,
                    f"c{i}",
                    model="demo",
                    version="1",
                    budget_ms=2000,
                    inputs={"input": x[i % len(x) :][:1]},
                )
            )
        replies = {}
        for _ in range(40):
            msg = protocol.parse_reply(await asyncio.wait_for(client.recv_multipart(), 5))
            replies[msg.id] = msg
        assert len(replies) == 40
        for i in range(40):
            r = replies[f"c{i}"]
            assert r.header["status"] == "ok"
            assert r.tensors["probability"][0, 0] == pytest.approx(expected[i % len(x)], rel=1e-5)
        assert max(r.header["timing"]["batch_size"] for r in replies.values()) > 1


async def test_an_envelope_of_requests_is_answered_in_envelopes_when_asked(model_dir, demo_registry):
    """Requests that ask for ``batch_replies`` get their replies from one batch in one envelope; the
    others one message each. Every request is answered exactly once either way, a malformed envelope
    gets a bad_request, and a bad message inside a good envelope does not cost its neighbours."""
    x, expected = example_rows(model_dir)

    def infer(i: int, **extra) -> list:
        return protocol.request(
            Kind.INFER, f"e{i}", model="demo", version="1", budget_ms=2000, inputs={"input": x[:1]}, **extra
        )

    async with serving(model_dir, demo_registry.uri, max_batch_size=64, max_latency_ms=20) as (_, client):
        messages = [infer(i, batch_replies=True) for i in range(6)] + [infer(i) for i in range(6, 9)]
        messages.append([b"\xc1 garbage"])
        await client.send_multipart(protocol.pack_batch(messages))
        answers: dict[str, list] = {}
        envelopes = 0
        while sum(map(len, answers.values())) < 10:
            parts = protocol.split(await asyncio.wait_for(client.recv_multipart(), 5))
            envelopes += len(parts) > 1
            for header, frames in parts:
                msg = protocol.parse_reply(frames, header)
                answers.setdefault(msg.id, []).append(msg)
        assert sorted(answers) == sorted([f"e{i}" for i in range(9)] + ["None"])  # the garbage has no id
        assert all(len(v) == 1 for v in answers.values())
        assert answers["None"][0].header["status"] == "bad_request"
        for i in range(9):
            r = answers[f"e{i}"][0]
            assert r.header["status"] == "ok"
            assert r.tensors["probability"][0, 0] == pytest.approx(expected[0], rel=1e-5)
        assert envelopes >= 1  # the six that asked, from one batch, came back together
        assert not await client.poll(200)  # and nothing twice

        await client.send_multipart([msgpack.packb({"v": 1, "kind": "batch", "frames": [5]}), b"x"])
        bad = protocol.parse_reply(await asyncio.wait_for(client.recv_multipart(), 5))
        assert bad.header["status"] == "bad_request" and "envelope" in bad.header["message"]


class SlowRunner:
    """Delegates to the real runner after a pause: work that is visibly still held during a drain."""

    def __init__(self, runner, delay_s: float) -> None:
        self.runner, self.delay_s = runner, delay_s

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def run(self, x):
        time.sleep(self.delay_s)
        return self.runner.run(x)


async def send_one_row_requests(client, x: np.ndarray, n: int, budget_ms: float) -> None:
    """Requests ``h0`` .. ``h{n-1}`` of one row each, sent without waiting for their answers."""
    for i in range(n):
        row = {"input": x[:1]}
        await client.send_multipart(
            protocol.request(Kind.INFER, f"h{i}", model="demo", version="1", budget_ms=budget_ms, inputs=row)
        )


async def test_draining_worker_refuses_new_work_and_answers_what_it_holds(model_dir, demo_registry):
    x, _ = example_rows(model_dir)
    async with serving(model_dir, demo_registry.uri, drain_grace_s=0.5, max_batch_size=4) as (server, client):
        server.slots["demo"].live.runner = SlowRunner(server.slots["demo"].live.runner, 0.3)
        await send_one_row_requests(client, x, 5, budget_ms=5000)
        await asyncio.sleep(0.05)  # received well within this; the first batch runs for 0.3 s
        assert server.slots["demo"].batcher.depth >= 1 and server.scheduler.in_flight == 1  # some running, some queued
        drain = asyncio.create_task(server.drain())
        await asyncio.sleep(0)
        assert not server.ready
        await client.send_multipart(
            protocol.request(Kind.INFER, "late", model="demo", version="1", budget_ms=2000, inputs={"input": x})
        )
        await client.send_multipart(protocol.request(Kind.PING, "p"))
        replies = {}
        while len(replies) < 7:
            msg = protocol.parse_reply(await asyncio.wait_for(client.recv_multipart(), 5))
            replies[msg.id] = msg.header
        late, pong = replies.pop("late"), replies.pop("p")
        statuses = {k: h["status"] for k, h in replies.items()}
        await asyncio.wait_for(drain, 5)
        assert late["status"] == "overloaded" and "draining" in late["message"]
        assert pong["draining"] is True
        assert statuses == {f"h{i}": "ok" for i in range(5)}


async def test_a_batch_the_model_fails_on_is_answered_error_and_the_next_one_runs(model_dir, demo_registry):
    x, expected = example_rows(model_dir)
    async with serving(model_dir, demo_registry.uri) as (server, client):
        runner = server.slots["demo"].get("1").runner
        real_run = runner.run
        calls = []

        def flaky(batch: np.ndarray) -> dict[str, np.ndarray]:
            calls.append(batch.shape[0])
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real_run(batch)

        runner.run = flaky
        first = protocol.request(Kind.INFER, "f", model="demo", version="1", budget_ms=2000, inputs={"input": x[:1]})
        r = await ask(client, first)
        assert r.header["status"] == "error"
        assert "boom" in r.header["message"]
        second = protocol.request(Kind.INFER, "s", model="demo", version="1", budget_ms=2000, inputs={"input": x[:1]})
        r = await ask(client, second)
        assert r.header["status"] == "ok"
        assert r.tensors["probability"][0, 0] == pytest.approx(expected[0], rel=1e-5)
        assert server.scheduler.in_flight == 0  # the failed batch gave its slot back


class _FailsAfterABatch(SimpleBatcher):
    """Raises on the poll right after the one that handed out a batch, once."""

    def __init__(self) -> None:
        super().__init__(max_batch_size=1)
        self.armed = False
        self.failed = False

    def poll(self, now: float, can_dispatch: bool) -> Poll:
        if self.armed and not self.failed:
            self.failed = True
            raise RuntimeError("batcher bug")
        result = super().poll(now, can_dispatch)
        self.armed = bool(result.batch)
        return result


async def test_a_batch_taken_before_the_batcher_failed_is_still_run_and_answered(model_dir, demo_registry):
    x, expected = example_rows(model_dir)
    batcher = _FailsAfterABatch()
    async with serving(model_dir, demo_registry.uri, batcher=batcher, batches_in_flight=2) as (_, client):
        # Two one-row batches in one burst (one envelope): the poll after the first one's raises.
        reqs = [
            protocol.request(Kind.INFER, i, model="demo", version="1", budget_ms=2000, inputs={"input": x[:1]})
            for i in "ab"
        ]
        await client.send_multipart(protocol.pack_batch(reqs))
        replies = [protocol.parse_reply(await asyncio.wait_for(client.recv_multipart(), 5)) for _ in reqs]
        assert batcher.failed
        assert sorted(r.id for r in replies) == ["a", "b"]
        for r in replies:
            assert r.header["status"] == "ok"
            assert r.tensors["probability"][0, 0] == pytest.approx(expected[0], rel=1e-5)


async def test_a_batch_whose_output_has_no_row_per_input_is_answered_error(model_dir, demo_registry):
    """Slicing such an output per request would raise halfway through the replies, leaving the batch
    unanswered; it is checked first, the batch answered ``error``, and the worker keeps serving."""
    x, _ = example_rows(model_dir)
    async with serving(model_dir, demo_registry.uri) as (server, client):
        runner = server.slots["demo"].get("1").runner
        real_run = runner.run
        runner.run = lambda batch: {**real_run(batch), "temperature": np.ones((), np.float32)}
        req = protocol.request(Kind.INFER, "z", model="demo", version="1", budget_ms=2000, inputs={"input": x[:1]})
        r = await ask(client, req, timeout=3.0)
        assert r.header["status"] == "error" and "temperature" in r.header["message"]
        runner.run = real_run
        again = protocol.request(Kind.INFER, "y", model="demo", version="1", budget_ms=2000, inputs={"input": x[:1]})
        assert (await ask(client, again)).header["status"] == "ok"
        assert server.scheduler.in_flight == 0


async def test_a_drain_that_runs_out_of_time_answers_everything_it_still_holds(model_dir, demo_registry):
    x, _ = example_rows(model_dir)
    async with serving(model_dir, demo_registry.uri, drain_grace_s=0.0, max_batch_size=1) as (server, client):
        server.slots["demo"].live.runner = SlowRunner(server.slots["demo"].live.runner, 1.0)
        await send_one_row_requests(client, x, 3, budget_ms=20_000)
        await asyncio.sleep(0.1)
        assert (
            server.slots["demo"].batcher.depth == 2 and server.scheduler.in_flight == 1
        )  # one running for 1 s, two queued
        await server.drain(timeout_s=0.3)
        replies = {}
        while len(replies) < 3:
            msg = protocol.parse_reply(await asyncio.wait_for(client.recv_multipart(), 2))
            replies[msg.id] = msg.header
        assert {k: h["status"] for k, h in replies.items()} == {f"h{i}": "overloaded" for i in range(3)}
        assert all("retry" in h["message"] for h in replies.values())
        await asyncio.sleep(1.0)  # the running batch ends after the drain: dropped, its slot given back
        assert server.scheduler.in_flight == 0 and not server.scheduler.running


def test_a_version_with_an_output_lacking_a_row_per_input_is_refused_at_load(model_dir):
    """Caught before the version goes live, so the one before it keeps serving."""
    model = load_version("demo", "1", model_dir)
    real_run = model.runner.run
    model.runner.run = lambda batch: {**real_run(batch), "temperature": np.ones((), np.float32)}
    with pytest.raises(versions.ModelCheckFailed, match="temperature"):
        versions._check(model)
    model.runner.run = lambda batch: {**real_run(batch), "temperature": np.ones((1, 1), np.float32)}
    with pytest.raises(versions.ModelCheckFailed, match="temperature"):  # the example has more than one row
        versions._check(model)
    model.runner.run = real_run
    versions._check(model)
