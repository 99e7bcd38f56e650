"""Session fixtures: a real sqlite MLflow registry with the demo model, and process factories."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/procs.py

from procs import AppProc, Proc, WorkerProc, app, stop_all, worker

from shared import registry
from shared.settings import home_registry_uri

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    """Options live here, at the tests' root: pytest reads ``pytest_addoption`` only from initial conftests."""
    parser.addoption(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=os.environ.get("TANDEM_TEST_DEVICE", "auto"),
        help="where the cuda-marked tests (tests/gpu) run: cuda; cpu, the same path on the CPU; auto (default), "
        "cuda when ONNX Runtime can open a CUDA session, else they skip. Env: TANDEM_TEST_DEVICE.",
    )


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
class ModelsRegistry:
    """Two models of different shapes, both at version 1 @production: numbers that collide across models."""

    uri: str
    home: Path
    refs: dict[str, registry.VersionRef]


@pytest.fixture(scope="session")
def models_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelsRegistry:
    from tandem.demo import register_demo

    home = tmp_path_factory.mktemp("models-registry")
    uri = home_registry_uri(home)
    refs = {
        "demo": register_demo(uri, "small", rows=3000, epochs=1),
        "churn": register_demo(uri, "small", rows=2000, epochs=1, dataset="churn"),
    }
    return ModelsRegistry(uri, home, refs)


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
    stop_all(s.procs)
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for p in s.procs:
            print(f"----- {p.name} log (tail) -----\n{p.log()[-4000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


# -- Redis (issue 6) ---------------------------------------------------------------------------------

from collections.abc import Callable  # noqa: E402 - appended section, kept self-contained


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` on a fixed free port: kill it and start it again on the same port."""

    port: int
    logs: Path
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import shutil

        import redis
        from procs import wait_for

        binary = shutil.which("redis-server")
        if binary is None:
            reason = "redis-server is not installed (apt-get install redis-server)"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = Proc(f"redis-{self.port}", argv, self.logs / f"redis-{self.port}.log").start()
        wait_for(lambda: redis.Redis.from_url(self.url, socket_timeout=1).ping(), 10, 0.05, f"redis on {self.port}")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.signal(9)
            self.proc.proc.wait(5)  # type: ignore[union-attr]
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a session-wide redis-server (no persistence); tests keep to their own entity ids."""
    from procs import free_port

    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.kill()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Private redis-servers for tests that kill and restart one; all are killed at the end."""
    started: list[RedisServer] = []

    def make() -> RedisServer:
        from procs import free_port

        server = RedisServer(free_port(), tmp_path / "redis").start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.kill()
