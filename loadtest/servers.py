"""Start and stop the benchmark's server configurations as real processes, each on the same CPUs.

Every configuration gets exactly the same CPU set (``server_cpus``), applied with ``sched_setaffinity``
in the child before it executes, so threads and processes it spawns later (ONNX Runtime's pool,
uvicorn's workers) inherit it. That, and nothing else, is what "the same CPU budget" means here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Server:
    """One running configuration: its processes, its /predict URL, and where its worker reports."""

    name: str
    base_url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    metrics_url: str | None = None
    worker_endpoint: str | None = None
    """The worker's ZeroMQ endpoint, for a client that talks to it directly (``loadtest/served.py``)."""

    @property
    def predict_url(self) -> str:
        return f"{self.base_url}/predict"

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{self.name}: a process exited ({dead[0].returncode}):\n{self.log_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if http_get(f"{self.base_url}/readyz")[0] == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: not ready within {timeout:.0f} s:\n{self.log_text()[-3000:]}")

    def settle(self, max_s: float = 5.0) -> None:
        """Wait until a backlog left by an overloaded step has drained (health answers fast again)."""
        deadline = time.monotonic() + max_s
        fast = 0
        while time.monotonic() < deadline and fast < 3:
            t0 = time.monotonic()
            with contextlib.suppress(OSError):
                http_get(f"{self.base_url}/healthz", timeout=max_s)
            fast = fast + 1 if time.monotonic() - t0 < 0.005 else 0
            time.sleep(0.1)

    def batch_totals(self) -> tuple[float, float] | None:
        """``(sum, count)`` of the worker's ``tandem_batch_size`` histograms, every model together;
        ``None`` without a worker."""
        if self.metrics_url is None:
            return None
        _, text = http_get(self.metrics_url, timeout=5)
        totals = {"tandem_batch_size_sum": 0.0, "tandem_batch_size_count": 0.0}
        for line in text.decode().splitlines():
            series, _, value = line.rpartition(" ")
            name = series.partition("{")[0]
            if name in totals:
                totals[name] += float(value)
        return totals["tandem_batch_size_sum"], totals["tandem_batch_size_count"]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def spawn(argv: list[str], log: Path, cpus: set[int], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, pinned to ``cpus`` before it runs a single instruction of its own."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )


def start_baseline(
    name: str,
    model_dir: Path,
    logs: Path,
    cpus: set[int],
    *,
    workers: int,
    intra_op_threads: int,
    version: str,
    device: str = "cpu",
) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "loadtest.baseline", "--model-dir", str(model_dir), "--port", str(port)]
    argv += ["--workers", str(workers), "--intra-op-threads", str(intra_op_threads), "--model-version", version]
    argv += ["--device", device]
    server = Server(name, f"http://127.0.0.1:{port}", logs=[logs / f"{name}.log"])
    server.procs.append(spawn(argv, server.logs[0], cpus))
    return server


def start_tandem(
    name: str,
    registry_uri: str,
    models: str,
    logs: Path,
    cpus: set[int],
    *,
    max_batch_size: int,
    max_latency_ms: float,
    batcher: str,
    intra_op_threads: int,
    device: str = "auto",
    worker_args: tuple[str, ...] = (),
    apps: int = 1,
    app_args: tuple[str, ...] = (),
) -> Server:
    """App server(s) + one worker (``--device``, and any other worker flags in ``worker_args``; app server
    flags in ``app_args``); with ``apps`` > 1, that many app servers sharing the port (``--reuse-port``,
    as ``tandem up --apps``)."""
    wport, mport, aport = free_port(), free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{wport}"
    tandem = [sys.executable, "-m", "tandem"]
    worker = [*tandem, "worker", "--bind", endpoint, "--models", models, "--registry-uri", registry_uri]
    worker += ["--max-batch-size", str(max_batch_size), "--max-latency-ms", str(max_latency_ms)]
    worker += ["--batcher", batcher, "--intra-op-threads", str(intra_op_threads), "--metrics-port", str(mport)]
    worker += ["--cache-dir", str(logs.parent / "cache"), "--poll-interval", "60", "--log-level", "WARNING"]
    worker += ["--device", device, *worker_args]
    app = [*tandem, "app", "--host", "127.0.0.1", "--port", str(aport), "--worker-urls", endpoint]
    app += ["--models", models, "--default-model", models.split(",")[0], "--log-level", "WARNING", *app_args]
    server = Server(
        name,
        f"http://127.0.0.1:{aport}",
        logs=[logs / f"{name}-worker.log", logs / f"{name}-app.log"],
        metrics_url=f"http://127.0.0.1:{mport}/metrics",
        worker_endpoint=endpoint,
    )
    env = {"TANDEM_LOG_FORMAT": "text"}
    server.procs.append(spawn(worker, server.logs[0], cpus, env))
    if apps == 1:
        server.procs.append(spawn(app, server.logs[1], cpus, env))
        return server
    for i in range(apps):
        server.procs.append(spawn([*app, "--reuse-port"], logs / f"{name}-app{i}.log", cpus, env))
    return server
