"""Session fixtures: a real sqlite MLflow registry with the demo model, and process factories."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/procs.py

from procs import AppProc, Proc, WorkerProc, app, worker

from shared import registry
from shared.settings import home_registry_uri

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class DemoRegistry:
    uri: str
    home: Path
    version: registry.VersionRef


@pytest.fixture(scope="session")
def demo_registry(tmp_path_factory: pytest.TempPathFactory) -> DemoRegistry:
    """A registry holding demo v1 @production (trained on fewer rows: tests need speed, not accuracy)."""
    from tandem.demo import register_demo

    home = tmp_path_factory.mktemp("registry")
    uri = home_registry_uri(home)
    ref = register_demo(uri, "small", rows=3000, epochs=1)
    return DemoRegistry(uri, home, ref)


@dataclass
class Stack:
    logs: Path
    procs: list[Proc]

    def worker(self, registry_uri: str, *extra: str, **kw) -> WorkerProc:
        p = worker(registry_uri, self.logs, *extra, **kw)
        self.procs.append(p)
        return p

    def app(self, worker_urls: list[str], *extra: str, **kw) -> AppProc:
        p = app(worker_urls, self.logs, *extra, **kw)
        self.procs.append(p)
        return p


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Start worker/app processes through this; all are stopped (and their logs shown on failure)."""
    s = Stack(tmp_path / "logs", [])
    yield s
    for p in s.procs:
        p.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for p in s.procs:
            print(f"----- {p.name} log (tail) -----\n{p.log()[-4000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
