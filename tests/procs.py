"""Real processes for tests: workers and app servers started as a user would, on free ports."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nobody listens on, for a server process to bind a moment later.

    Taken below the kernel's ephemeral range: a port from ``bind(0)`` lies inside it, and one of the
    many outgoing connections the tests open could take it before the server binds it ("address
    already in use", seen once in CI). Never the same port twice in one test session.
    """
    low = _ephemeral_low()
    if low <= 20_000:  # an unusual range: fall back to the kernel's choice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(1000):
        port = random.randrange(15_000, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        env = {**os.environ, "TANDEM_LOG_FORMAT": "json", **self.env}
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.killpg(self.proc.pid, sig)  # type: ignore[union-attr]

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def stop_all(procs: list[Proc], timeout: float = 10.0) -> None:
    """SIGTERM to every process at once, then wait for each: a worker's drain takes about a second, so
    stopping a stack one process after another cost a second per process."""
    for p in procs:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        if p.proc is not None:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.signal(signal.SIGKILL)
                p.proc.wait(5)


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """Value of one sample in a Prometheus exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name_part, _, label_part = key.partition("{")
        got = ",".join(sorted(label_part.rstrip("}").split(","))) if label_part else ""
        if name_part == name and got == want:
            return float(value)
    return 0.0


@dataclass
class WorkerProc(Proc):
    endpoint: str = ""
    metrics_port: int = 0

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def counter(self, name: str, **labels: str) -> float:
        """Value of one sample in the worker's /metrics (0 if absent)."""
        return sample(self.metrics(), name, **labels)


@dataclass
class AppProc(Proc):
    url: str = ""

    def counter(self, name: str, **labels: str) -> float:
        """Value of one sample in the app server's /metrics (0 if absent)."""
        return sample(httpx.get(f"{self.url}/metrics", timeout=5).text, name, **labels)


def tandem_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tandem", *args]


def worker(
    registry_uri: str, logs: Path, *extra: str, model: str = "demo", env: dict[str, str] | None = None
) -> WorkerProc:
    port, mport = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    argv = tandem_argv(
        "worker",
        "--bind",
        endpoint,
        "--model",
        model,
        "--registry-uri",
        registry_uri,
        "--metrics-port",
        str(mport),
        "--cache-dir",
        str(logs / "cache"),
        *extra,
    )
    return WorkerProc(
        f"worker-{port}", argv, logs / f"worker-{port}.log", env or {}, endpoint=endpoint, metrics_port=mport
    ).start()


def app(
    worker_urls: list[str], logs: Path, *extra: str, model: str | None = "demo", env: dict[str, str] | None = None
) -> AppProc:
    """An app server; ``model`` is its ``--model`` (the default model), ``None`` for none."""
    port = free_port()
    argv = tandem_argv(
        "app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        ",".join(worker_urls),
        *(["--model", model] if model else []),
        "--heartbeat-interval",
        "0.2",
        *extra,
    )
    return AppProc(f"app-{port}", argv, logs / f"app-{port}.log", env or {}, url=f"http://127.0.0.1:{port}").start()


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s (last error: {last})")


def wait_ready(app_proc: AppProc, timeout: float = 60.0) -> None:
    def ready() -> bool:
        if not app_proc.alive:
            raise RuntimeError(f"app server exited:\n{app_proc.log()[-3000:]}")
        return httpx.get(f"{app_proc.url}/readyz", timeout=2).status_code == 200

    wait_for(ready, timeout, what=f"{app_proc.url}/readyz == 200")


@contextlib.contextmanager
def one_worker_stack(registry_uri: str, logs: Path) -> Iterator[tuple[AppProc, WorkerProc]]:
    """One worker and one app server, ready, for a module's tests that only send requests (starting a
    stack per test costs seconds); both logs are printed if it does not get ready."""
    w = worker(registry_uri, logs)
    a = app([w.endpoint], logs)
    try:
        wait_ready(a)
        yield a, w
    except BaseException:
        print(f"----- app log -----\n{a.log()[-3000:]}\n----- worker log -----\n{w.log()[-3000:]}")
        raise
    finally:
        stop_all([a, w])
