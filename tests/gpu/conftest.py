"""Fixtures of the GPU path's tests: the device they run on, registries, worker processes, a wire client.

Every test here is marked ``cuda`` and takes its device from ``--device`` (tests/conftest.py): on
``cuda`` it proves the CUDA path, on ``cpu`` it runs the very same code on the CPU, so CI keeps these
tests (and loadtest/gpu_check.sh, which runs them) working between the rare runs on a GPU.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import zmq
from procs import WorkerProc, wait_for, worker

from loadtest.engine import cuda_problem
from shared import protocol, registry
from shared.features import load_spec
from shared.protocol import Kind
from shared.settings import home_registry_uri

TOLERANCE = {"cpu": {"rtol": 1e-5, "atol": 1e-6}, "cuda": {"rtol": 0.0, "atol": 1e-3}}
"""Answers against a CPU session. On the CPU the same kernels run; on CUDA other kernels do (and TF32
matrix products, if ONNX Runtime's CUDA provider uses them), so the answers move: 1e-3 on a probability
is an allowance, not a measured bound, until a GPU run reports the real difference (gpu_check.json)."""


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """``cuda`` or ``cpu``; ``auto`` without a usable GPU skips (``--device cuda`` without one fails)."""
    wanted = request.config.getoption("--device")
    if wanted == "cpu":
        return "cpu"
    problem = cuda_problem()
    if problem is None:
        return "cuda"
    if wanted == "cuda":
        pytest.fail(f"--device cuda, but no CUDA session can be opened: {problem}")
    pytest.skip(f"no CUDA device ({problem}); --device cpu runs these tests on the CPU")


@pytest.fixture(scope="session")
def tolerance(device: str) -> dict[str, float]:
    """``assert_allclose`` keywords for answers on ``device`` against a CPU session."""
    return TOLERANCE[device]


@dataclass
class Version:
    """A model folder, its input width, and a CPU session of it: the reference answers."""

    folder: Path
    width: int
    session: ort.InferenceSession

    def expected(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["probability"], {"input": x})[0]


def reference(folder: Path) -> Version:
    files = registry.model_files(folder)
    spec = load_spec(files["feature_spec"].read_text())
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    return Version(folder, spec.width, session)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Version]:
    """Demo v1 and v2: two seeds of the small model, with the same features (rows encode alike)."""
    from tandem.demo import build_model_dir

    root = tmp_path_factory.mktemp("gpu-models")
    return {
        v: reference(build_model_dir(root / f"v{v}", "small", seed=seed, rows=2000, epochs=1))
        for v, seed in (("1", 7), ("2", 11))
    }


@pytest.fixture(scope="module")
def gpu_registry(tmp_path_factory: pytest.TempPathFactory, versions: dict[str, Version]) -> str:
    """A registry holding demo v1 @production and v2 with no alias (a test promotes it, then moves the
    alias back). One per module: creating an MLflow registry costs seconds."""
    home = tmp_path_factory.mktemp("gpu-registry")
    uri = home_registry_uri(home)
    assert registry.register(uri, "demo", versions["1"].folder).version == "1"
    assert registry.register(uri, "demo", versions["2"].folder, alias_if_first=None).version == "2"
    return uri


@pytest.fixture
def start_worker(tmp_path: Path, device: str, request: pytest.FixtureRequest) -> Iterator:
    """Start a ``tandem worker`` process on the test's device, ready; stopped (log shown on failure) after."""
    started: list[WorkerProc] = []

    def start(registry_uri: str, *extra: str) -> WorkerProc:
        w = worker(registry_uri, tmp_path / "logs", "--device", device, *extra)
        started.append(w)

        def ready() -> bool:
            if not w.alive:
                raise RuntimeError(f"worker exited:\n{w.log()[-3000:]}")
            return httpx.get(f"http://127.0.0.1:{w.metrics_port}/readyz", timeout=2).status_code == 200

        wait_for(ready, 90, 0.1, "worker ready")
        return w

    yield start
    for w in started:
        w.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for w in started:
            print(f"----- {w.name} log (tail) -----\n{w.log()[-4000:]}")
    shutil.rmtree(tmp_path / "logs" / "cache", ignore_errors=True)


class Client:
    """A DEALER socket speaking the worker's wire protocol, synchronously (no event loop needed)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(endpoint)
        self._ids = itertools.count()

    def send_infer(self, x: np.ndarray, version: str | None = None, budget_ms: float = 10_000) -> str:
        msg_id = f"r{next(self._ids)}"
        frames = protocol.request(
            Kind.INFER, msg_id, model="demo", version=version, budget_ms=budget_ms, inputs={"input": x}
        )
        self.sock.send_multipart(frames, copy=False)
        return msg_id

    def recv(self, timeout_s: float = 20.0) -> protocol.Message:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no reply within {timeout_s} s")
        return protocol.parse_reply(self.sock.recv_multipart(copy=False))

    def ping(self) -> dict:
        self.sock.send_multipart(protocol.request(Kind.PING, f"p{next(self._ids)}"))
        return self.recv().header

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def client_for() -> Iterator:
    clients: list[Client] = []

    def make(w: WorkerProc) -> Client:
        clients.append(Client(w.endpoint))
        return clients[-1]

    yield make
    for c in clients:
        c.close()
