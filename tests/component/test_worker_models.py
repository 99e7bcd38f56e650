"""A worker serving several models, in-process over real ZeroMQ, following a real sqlite registry:
each request answered by its own model, ``*`` following the registry, and the memory budget."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from worker_harness import ask, running

from ml_worker.server import WorkerServer
from shared import protocol, registry
from shared.features import load_spec
from shared.protocol import Kind
from shared.settings import WorkerSettings, home_registry_uri


@contextlib.asynccontextmanager
async def serving(registry_uri: str, tmp_path: Path, **overrides):
    settings = WorkerSettings(
        bind="tcp://127.0.0.1:*", registry_uri=registry_uri, cache_dir=tmp_path / "cache", **overrides
    )
    async with running(WorkerServer(settings), watch=True) as served:
        yield served


async def heartbeat(client) -> dict:
    return (await ask(client, protocol.request(Kind.PING, "hb"))).header


async def until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout} s")


def local(uri: str, ref: registry.VersionRef, cache: Path):
    """The version's spec, its example rows encoded, and its ONNX session run directly."""
    folder = registry.download(uri, ref, cache)
    files = registry.model_files(folder)
    spec = load_spec(files["feature_spec"].read_text())
    x = spec.encoder.encode(registry.read_input_example(folder)["instances"])
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    return spec, x, session.run(None, {"input": x})[0]


def infer(msg_id: str, model: str, x: np.ndarray, version: str | None = "1", budget_ms: float = 2000) -> list:
    return protocol.request(Kind.INFER, msg_id, model=model, version=version, budget_ms=budget_ms, inputs={"input": x})


async def test_each_model_answers_with_its_own_version_one(models_registry, tmp_path):
    uri = models_registry.uri
    demo = local(uri, models_registry.refs["demo"], tmp_path / "dl")
    churn = local(uri, models_registry.refs["churn"], tmp_path / "dl")
    assert demo[0].width != churn[0].width  # two shapes
    async with serving(uri, tmp_path, models="demo,churn", poll_interval=0.2) as (server, client):

        async def both_live() -> bool:
            models = (await heartbeat(client))["models"]
            return all(models.get(m, {}).get("live") == "1" for m in ("demo", "churn"))

        await until(both_live, what="both models live")
        ok_before = server.slots["demo"].metrics.requests["ok"]._value.get()  # the registry is per process
        hb = await heartbeat(client)
        assert set(hb["models"]) == {"demo", "churn"} and hb["models"]["churn"]["loaded"] is True
        # Interleaved, in one burst: version "1" of each model must not be confused with the other's.
        pairs = (("demo", demo), ("churn", churn))
        burst = [infer(f"{m}{i}", m, s[1]) for i in range(3) for m, s in pairs]
        await client.send_multipart(protocol.pack_batch(burst))
        got = {}
        while len(got) < 6:
            for header, frames in protocol.split(await asyncio.wait_for(client.recv_multipart(), 10)):
                msg = protocol.parse_reply(frames, header)
                got[msg.id] = msg
        for i in range(3):
            for m, (_, _, expected) in (("demo", demo), ("churn", churn)):
                r = got[f"{m}{i}"]
                assert r.header["status"] == "ok" and r.header["model"] == m and r.header["version"] == "1"
                np.testing.assert_allclose(r.tensors["probability"], expected, rtol=1e-5)
        desc = await ask(client, protocol.request(Kind.DESCRIBE, "d", model="churn", version="1"))
        assert desc.header["model"] == "churn"
        assert desc.header["describe"]["feature_spec"]["entity"] == "customer"
        wrong = await ask(client, infer("w", "churn", demo[1]))  # a fraud tensor sent to churn
        assert wrong.header["status"] == "bad_request" and f"float32[n, {churn[0].width}]" in wrong.header["message"]
        unknown = await ask(client, infer("u", "nope", demo[1]))
        assert unknown.header["status"] == "model_not_found"
        assert server.slots["demo"].metrics.requests["ok"]._value.get() - ok_before == 3


async def test_every_model_with_the_alias_is_served_and_one_that_loses_it_leaves(demo_registry, tmp_path):
    folder = registry.download(demo_registry.uri, demo_registry.version, tmp_path / "src")
    uri = home_registry_uri(tmp_path / "registry")
    registry.register(uri, "first", folder)
    x = local(uri, registry.resolve(uri, "first"), tmp_path / "dl")[1]
    async with serving(uri, tmp_path, models="*", poll_interval=0.2) as (server, client):

        async def live(model: str) -> bool:
            return (await heartbeat(client))["models"].get(model, {}).get("live") == "1"

        await until(lambda: live("first"), what="first served")
        registry.register(uri, "second", folder)  # registered and promoted while the worker runs
        t0 = time.monotonic()
        await until(lambda: live("second"), what="second served without a restart")
        assert time.monotonic() - t0 < 2 * 0.2 * 1.2 + 3.0  # two polls, plus the load itself
        assert (await ask(client, infer("s", "second", x))).header["status"] == "ok"
        registry.register(uri, "not a url name", folder)  # MLflow takes it; Tandem cannot route it
        await asyncio.sleep(0.6)  # a few polls
        assert set((await heartbeat(client))["models"]) == {"first", "second"}
        registry.client(uri).delete_registered_model_alias("first", "production")

        async def gone() -> bool:
            return "first" not in (await heartbeat(client))["models"] and "first" not in server.slots

        await until(gone, what="first unloaded")
        assert (await ask(client, infer("f", "first", x))).header["status"] == "model_not_found"
        assert (await ask(client, infer("s2", "second", x))).header["status"] == "ok"


async def test_a_budget_for_one_model_loads_the_other_again_on_demand(models_registry, tmp_path):
    uri = models_registry.uri
    demo = local(uri, models_registry.refs["demo"], tmp_path / "dl")
    churn = local(uri, models_registry.refs["churn"], tmp_path / "dl")
    # Smaller than either model: at most one stays in memory, the least recently used one goes.
    async with serving(uri, tmp_path, models="demo,churn", poll_interval=0.2, max_resident_mb=0.01) as (
        server,
        client,
    ):

        async def both_known() -> bool:
            models = (await heartbeat(client))["models"]
            return all(models.get(m, {}).get("live") == "1" for m in ("demo", "churn"))

        await until(both_known, what="both models known")
        await asyncio.sleep(1.2)  # housekeeping enforces the budget within a second
        loaded = [m for m, s in server.slots.items() if s.live is not None]
        assert len(loaded) == 1
        for i in range(6):  # alternate: every request finds its model unloaded, and waits for the load
            m, (_, x, expected) = ("demo", demo) if i % 2 else ("churn", churn)
            r = await ask(client, infer(f"a{i}", m, x))
            assert r.header["status"] == "ok", r.header
            np.testing.assert_allclose(r.tensors["probability"], expected, rtol=1e-5)
        assert sum(s.live is not None for s in server.slots.values()) == 1
        hb = (await heartbeat(client))["models"]
        idle = next(m for m in hb if not hb[m]["loaded"])
        assert hb[idle]["live"] == "1"  # still served, and still the version the app encodes for
        # A budget shorter than the model's load: answered at once, with when to come back.
        x = demo[1] if idle == "demo" else churn[1]
        r = await ask(client, infer("quick", idle, x, budget_ms=1))
        assert r.header["status"] == "model_loading" and r.header["retry_after_ms"] >= 1
        # ...while the load it started goes on: the next request finds it in memory.
        await until(lambda: _loaded(client, idle), what="loaded after the refusal")
        assert (await ask(client, infer("again", idle, x))).header["status"] == "ok"


async def _loaded(client, model: str) -> bool:
    return (await heartbeat(client))["models"][model]["loaded"]


@pytest.mark.parametrize("version", [None, "1"])
async def test_a_request_without_a_model_name_goes_to_the_only_model(demo_registry, tmp_path, version):
    """An app server from before many models sends ``model: ""``; a one-model worker still serves it."""
    x = local(demo_registry.uri, demo_registry.version, tmp_path / "dl")[1]
    async with serving(demo_registry.uri, tmp_path, model="demo", poll_interval=0.2) as (_, client):
        await until(lambda: _loaded(client, "demo"), what="demo live")
        r = await ask(client, infer("old", "", x, version=version))
        assert r.header["status"] == "ok" and r.header["model"] == "demo"
