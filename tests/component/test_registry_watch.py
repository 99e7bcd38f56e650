"""The registry watcher against a real sqlite MLflow registry of its own (the session's demo registry
keeps its aliases): what goes live, what does not, and that nothing stops it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

import pytest

from ml_worker import loader
from ml_worker.loader import Loader
from ml_worker.registry_watch import MAX_BACKOFF_S, ModelWatch
from ml_worker.server import make_batcher
from ml_worker.slots import ModelSlot
from shared import registry
from shared.model_targets import ModelTarget
from shared.settings import WorkerSettings, home_registry_uri

NAME = "watched"


@pytest.fixture
def reg(demo_registry, tmp_path: Path) -> tuple[str, Path]:
    """A registry with ``watched`` v1 @production and v2 (the same files), and the folder they came from."""
    folder = registry.download(demo_registry.uri, demo_registry.version, tmp_path / "src")
    uri = home_registry_uri(tmp_path / "registry")
    assert registry.register(uri, NAME, folder).version == "1"
    assert registry.register(uri, NAME, folder).version == "2"
    return uri, folder


def watcher(uri: str, tmp_path: Path) -> ModelWatch:
    settings = WorkerSettings(bind="tcp://127.0.0.1:*", registry_uri=uri, model=NAME, poll_interval=0.05)
    slot = ModelSlot(ModelTarget(NAME), make_batcher(settings, NAME))
    return ModelWatch(slot, Loader(settings, tmp_path / "cache"), settings.poll_interval)


async def test_a_version_withdrawn_while_it_loaded_does_not_go_live(reg, tmp_path, monkeypatch):
    uri, _ = reg
    w = watcher(uri, tmp_path)
    assert (await w.poll_once()).version == "1"
    registry.set_alias(uri, NAME, "production", "2")
    real_load = loader.load_version

    def load_then_roll_back(*args, **kwargs):
        model = real_load(*args, **kwargs)
        registry.set_alias(uri, NAME, "production", "1")  # the operator takes v2 back while it warms up
        return model

    monkeypatch.setattr(loader, "load_version", load_then_roll_back)
    assert await w.poll_once() is None
    assert w.slot.live.version == "1" and w.slot.versions == ["1"]


async def test_failures_back_off_to_a_cap_however_many_and_never_stop_the_watcher(reg, tmp_path, monkeypatch):
    uri, _ = reg
    w = watcher(uri, tmp_path)
    assert (await w.poll_once()).version == "1"
    registry.set_alias(uri, NAME, "production", "2")

    def broken(*args, **kwargs):
        raise RuntimeError("bad files")

    monkeypatch.setattr(loader, "load_version", broken)
    w._failures["2"] = (5000, 0.0)  # thousands of failed tries before: 2**5000 overflows a float
    assert await w.poll_once() is None
    attempts, next_try = w._failures["2"]
    assert attempts == 5001 and next_try <= time.monotonic() + MAX_BACKOFF_S
    assert w.slot.live.version == "1"

    polls = []

    async def failing_poll():
        polls.append(1)
        raise RuntimeError("a bug in a poll")

    monkeypatch.setattr(w, "poll_once", failing_poll)
    task = asyncio.create_task(w.run())
    await asyncio.sleep(0.5)
    assert not task.done() and len(polls) >= 3  # still polling after each failure
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_number_reused_by_a_new_registration_is_new_files(reg, tmp_path):
    """Delete a model and register it again: MLflow numbers from 1 again. The cache and the watcher
    must see different files under the same number, not serve the old ones."""
    uri, folder = reg
    w = watcher(uri, tmp_path)
    first = await w.poll_once()
    assert first.version == "1"
    again = tmp_path / "again"
    shutil.copytree(folder, again)
    (again / "extra_files" / "notes.txt").write_text("registered again\n")
    registry.client(uri).delete_registered_model(NAME)
    ref = registry.register(uri, NAME, again)
    assert ref.version == "1"
    path = registry.download(uri, ref, tmp_path / "cache")
    assert path != first.model_dir and (path / "extra_files" / "notes.txt").exists()
    second = await w.poll_once()
    assert second is not None and second.version == "1" and second.model_dir == path
    assert w.slot.live is second
    assert await w.poll_once() is None  # and once live, it is not loaded again
