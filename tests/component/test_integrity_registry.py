"""Model integrity against a real sqlite registry and a worker in-process over real ZeroMQ: a version
whose files changed after registration (in the artifact store, or in the worker's download cache) is
refused naming the file while the old version keeps answering; one registered by MLflow alone serves
unverified, unless the worker requires integrity."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import onnx
import pytest
from worker_harness import ask, running

from ml_worker import metrics
from ml_worker.loader import Loader
from ml_worker.server import WorkerServer, make_batcher
from ml_worker.slots import ModelSlot
from shared import integrity, protocol, registry
from shared.errors import IntegrityError
from shared.features import load_spec
from shared.model_targets import ModelTarget
from shared.protocol import Kind
from shared.settings import WorkerSettings, home_registry_uri

NAME = "guarded"
POLL_S = 0.1


@pytest.fixture
def source(demo_registry, tmp_path: Path) -> Path:
    """The demo model's files, as a user's folder (without the manifest registration adds)."""
    folder = registry.download(demo_registry.uri, demo_registry.version, tmp_path / "src")
    (folder / integrity.MANIFEST).unlink()
    return folder


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return home_registry_uri(tmp_path / "registry")


def store_path(ref: registry.VersionRef) -> Path:
    """Where a version's files are in the sqlite registry's artifact folder."""
    return Path(unquote(urlparse(ref.source).path))


def tamper(model_onnx: Path) -> None:
    """Another valid model in place of the registered one: it would load and serve without the check."""
    model = onnx.load(str(model_onnx))
    model.doc_string = "not the registered weights"
    onnx.save(model, str(model_onnx))


def infer(folder: Path, msg_id: str) -> list:
    spec = load_spec(registry.model_files(folder)["feature_spec"].read_text())
    x = spec.encoder.encode(registry.read_input_example(folder)["instances"])
    return protocol.request(Kind.INFER, msg_id, model=NAME, version=None, budget_ms=2000, inputs={"input": x})


@contextlib.asynccontextmanager
async def serving(uri: str, cache: Path, **overrides):
    settings = WorkerSettings(
        bind="tcp://127.0.0.1:*", registry_uri=uri, model=NAME, cache_dir=cache, poll_interval=POLL_S, **overrides
    )
    async with running(WorkerServer(settings), watch=True) as served:
        yield served


async def until_model(client, predicate, what: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hb = (await ask(client, protocol.request(Kind.PING, "hb"))).header["models"].get(NAME, {})
        if predicate(hb):
            return hb
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout} s")


def counts() -> dict[str, float]:
    """This model's integrity results and failed swaps (the metrics registry is the test process's)."""
    found = {r: metrics.INTEGRITY.labels(NAME, r)._value.get() for r in metrics.INTEGRITY_RESULTS}
    return {**found, "failed": metrics.SWAPS.labels(NAME, "failed")._value.get()}


def grown(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in counts().items() if v != before[k]}


def test_registration_records_every_file_and_its_manifest(uri, source):
    ref = registry.register(uri, NAME, source)
    stored = store_path(ref)
    data = (stored / integrity.MANIFEST).read_bytes()
    assert ref.tags[integrity.TAG] == integrity.digest(data)
    assert integrity.manifest_bytes(integrity.manifest_of(source)) == data
    assert {"MLmodel", "model.onnx", "extra_files/feature_spec.json"} <= set(integrity.manifest_of(stored))
    assert integrity.verify(stored, ref.tags[integrity.TAG]) is True


@pytest.mark.parametrize("where", ["artifact store", "download cache"])
async def test_a_version_changed_after_registration_is_refused_and_the_old_one_serves(uri, source, tmp_path, where):
    registry.register(uri, NAME, source)
    v2 = registry.register(uri, NAME, source)  # the same files: only the tampering tells them apart
    cache = tmp_path / "cache"
    if where == "artifact store":
        tamper(store_path(v2) / "model.onnx")
    else:  # a cached copy, as a worker (or another one sharing the cache) left it
        tamper(registry.download(uri, v2, cache) / "model.onnx")
    before = counts()
    async with serving(uri, cache) as (_, client):
        await until_model(client, lambda m: m.get("live") == "1", "v1 live")
        assert grown(before) == {"verified": 1}
        registry.set_alias(uri, NAME, "production", "2")
        model = await until_model(client, lambda m: "refused" in m, "v2 refused")
        assert model["live"] == "1" and model["refused"]["version"] == "2"
        assert model["refused"]["error"] == "files not as registered: model.onnx (changed since registration)"
        reply = await ask(client, infer(source, "after"))
        assert reply.header["status"] == "ok" and reply.header["version"] == "1"
        after = grown(before)  # v2 may have been retried meanwhile: each try fails the same way
        assert after["verified"] == 1 and after["mismatch"] == after["failed"] >= 1 and len(after) == 3


async def test_a_file_added_to_the_cache_is_refused(uri, source, tmp_path):
    ref = registry.register(uri, NAME, source)
    cached = registry.download(uri, ref, tmp_path / "cache")
    (cached / "code").mkdir()
    (cached / "code" / "sitecustomize.py").write_text("print('ran')\n")
    async with serving(uri, tmp_path / "cache") as (_, client):
        model = await until_model(client, lambda m: "refused" in m, "v1 refused")
        assert "code/sitecustomize.py (not registered with the version)" in model["refused"]["error"]
        assert model.get("live") is None


def mlflow_only(uri: str, folder: Path) -> registry.VersionRef:
    """A version registered the ordinary MLflow way: files logged in a run, a version made from them."""
    c = registry.client(uri)
    run = c.create_run(registry._experiment_id(c, uri))
    c.log_artifacts(run.info.run_id, str(folder), artifact_path="model")
    mv = c.create_model_version(NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    c.set_registered_model_alias(NAME, "production", mv.version)
    return registry.get_version(uri, NAME, mv.version)


async def test_an_mlflow_only_version_serves_unverified_unless_integrity_is_required(uri, source, tmp_path):
    registry.client(uri).create_registered_model(NAME)
    ref = mlflow_only(uri, source)
    assert integrity.TAG not in ref.tags
    before = counts()
    async with serving(uri, tmp_path / "cache") as (_, client):
        await until_model(client, lambda m: m.get("live") == ref.version, "served unverified")
        assert (await ask(client, infer(source, "u"))).header["status"] == "ok"
        assert grown(before) == {"unverified": 1}
    before = counts()
    async with serving(uri, tmp_path / "cache2", require_integrity=True) as (_, client):
        model = await until_model(client, lambda m: "refused" in m, "refused: integrity required")
        assert model.get("live") is None and grown(before)["failed"] >= 1
        assert model["refused"]["error"].startswith("no tandem.files.sha256 tag (registered by MLflow alone?)")
        assert f"tandem register models:/{NAME}/{ref.version}" in model["refused"]["error"]


def test_registering_files_already_in_the_store_records_them_unless_they_changed(uri, source, tmp_path):
    registry.client(uri).create_registered_model(NAME)
    plain = mlflow_only(uri, source)
    assert not (store_path(plain) / integrity.MANIFEST).exists()
    sealed = registry.register_source(uri, NAME, plain.source, run_id=plain.run_id)  # downloads to hash
    assert integrity.verify(store_path(plain), sealed.tags[integrity.TAG]) is True  # the manifest went beside them
    again = registry.register_source(uri, NAME, plain.source, files=registry.download(uri, plain, tmp_path / "dl"))
    assert again.tags[integrity.TAG] == sealed.tags[integrity.TAG]
    tamper(store_path(plain) / "model.onnx")
    with pytest.raises(IntegrityError, match=r"not as first registered: model.onnx \(changed since registration\)"):
        registry.register_source(uri, NAME, plain.source)


async def test_loading_an_unloaded_version_again_checks_its_cached_files(uri, source, tmp_path):
    ref = registry.register(uri, NAME, source)
    settings = WorkerSettings(bind="tcp://127.0.0.1:*", registry_uri=uri, model=NAME)
    slot = ModelSlot(ModelTarget(NAME), make_batcher(settings, NAME))
    loader = Loader(settings, tmp_path / "cache")
    slot.swap(await loader.load(slot, ref), time.monotonic())
    slot.unload()  # the memory budget took it out; its files stay in the cache
    assert (await loader.reload(slot)).version == "1"  # as cached: checked, and loaded
    shutil.copyfile(source / "MLmodel", slot.unloaded.model_dir / "extra_files" / "feature_spec.json")
    with pytest.raises(IntegrityError, match=r"extra_files/feature_spec.json \(changed since registration\)"):
        await loader.reload(slot)
