"""Open-loop load generator: requests leave on a schedule, whether or not earlier ones have answered.

A closed-loop tool (Locust, ab, wrk without -R) waits for an answer before sending the next request,
so a slow server slows the load down and its stalls never show in the latency: coordinated omission.
Here the send times are fixed in advance (evenly spaced, or Poisson arrivals) and every latency is
measured from the *scheduled* send time, so time spent waiting for a free connection, or by the
generator itself falling behind, counts against the server as a user would see it.

Bounded by construction: the schedule holds ``rate * duration`` requests (capped), and once it is
exhausted the run waits at most one request timeout for stragglers, then reports them as timeouts.
Every scheduled request is accounted for exactly once: ``ok + sum(errors) == sent``.

    python -m loadtest.openloop --url URL --body-file F --rate R --duration S \\
        [--poisson] [--timeout-ms T] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import math
import socket
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import report
from loadtest.httpclient import Connection, build_request

MAX_REQUESTS = 2_000_000
"""Most requests one run may schedule: a typo in ``--rate`` must not become an unbounded flood."""
SWEEP_S = 0.005
"""How often in-flight requests are checked against their timeout."""


def schedule(rate: float, duration: float, *, poisson: bool = False, seed: int = 0) -> np.ndarray:
    """Send offsets in seconds from the start, all inside ``[0, duration)``.

    Fixed: exactly ``rate * duration`` evenly spaced sends. Poisson: exponential gaps of mean ``1/rate``
    from a seeded generator, so the same seed replays the same bursts.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    expected = rate * duration
    if expected > MAX_REQUESTS:
        raise ValueError(f"{expected:.0f} requests scheduled, at most {MAX_REQUESTS} per run")
    if not poisson:
        return np.arange(math.floor(expected + 1e-9)) / rate
    rng = np.random.default_rng(seed)
    n = int(expected + 6 * math.sqrt(expected) + 16)  # enough gaps to cover the window almost surely
    times = np.cumsum(rng.exponential(1.0 / rate, n))
    return times[times < duration]


def percentile(sorted_values: list[float] | np.ndarray, p: float) -> float | None:
    """Nearest-rank percentile of already sorted values: a value that was really observed."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = max(1, math.ceil(p / 100.0 * n))
    return float(sorted_values[min(rank, n) - 1])


def summarize(
    rate: float,
    latencies_ms: list[float],
    outcomes: Counter[str],
    versions: Counter[str],
    span_s: float,
    refused_ms: list[float] | None = None,
) -> dict[str, Any]:
    """The run's summary (the JSON the command prints). Latency percentiles are over successful answers;
    errors are counted, and how long refusals took (any non-200 answer that came back: a 503 that took
    a second is an overload failure even though it is not a timeout) is ``refused_p99_ms``."""
    lat = np.sort(np.asarray(latencies_ms, dtype=np.float64))
    ok = outcomes.get("ok", 0)

    def ms(p: float) -> float | None:
        v = percentile(lat, p)
        return None if v is None else round(v, 3)

    return {
        "rate": rate,
        "sent": sum(outcomes.values()),
        "ok": ok,
        "errors": {k: v for k, v in sorted(outcomes.items()) if k != "ok"},
        "throughput": round(ok / span_s, 2) if span_s > 0 else 0.0,
        "p50_ms": ms(50),
        "p95_ms": ms(95),
        "p99_ms": ms(99),
        "p999_ms": ms(99.9),
        "max_ms": round(float(lat[-1]), 3) if len(lat) else None,
        "refused_p99_ms": _round(percentile(sorted(refused_ms or []), 99)),
        "versions": dict(sorted(versions.items())),
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


class _Generator:
    """One run: a bounded pool of keep-alive connections fed from the schedule."""

    def __init__(self, url: str, body: bytes, timeout_s: float, max_connections: int, headers: dict[str, str]):
        self.host, self.port, self.request = build_request(url, body, headers)
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.idle: list[Connection] = []
        self.busy: set[Connection] = set()
        self.opening = 0
        self.backlog: deque[float] = deque()
        """Scheduled send times waiting for a free connection."""
        self.measure_from = 0.0
        self.latencies_ms: list[float] = []
        self.refused_ms: list[float] = []
        """How long each answered non-200 took (not timeouts nor broken connections)."""
        self.outcomes: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.last_done = 0.0
        self.loop = asyncio.get_running_loop()

    @property
    def outstanding(self) -> int:
        return len(self.busy) + len(self.backlog)

    def record(self, scheduled: float, outcome: str, version: str | None = None) -> None:
        if scheduled < self.measure_from:
            return  # warm-up request: sent and answered, not counted
        now = time.monotonic()
        self.last_done = now
        self.outcomes[outcome] += 1
        if outcome == "ok":
            self.latencies_ms.append((now - scheduled) * 1000.0)
            self.versions[version or "?"] += 1
        elif outcome.isdigit():
            self.refused_ms.append((now - scheduled) * 1000.0)

    def dispatch(self, scheduled: float) -> None:
        if self.idle:
            conn = self.idle.pop()
            self.busy.add(conn)
            conn.send(self.request, scheduled)
            return
        self.backlog.append(scheduled)
        if len(self.busy) + len(self.idle) + self.opening < self.max_connections:
            self.opening += 1
            self.loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            _, conn = await self.loop.create_connection(self._protocol, self.host, self.port)
        except OSError:
            self.opening -= 1
            if self.backlog:  # the request that asked for this connection fails, visibly
                self.record(self.backlog.popleft(), "connection")
            return
        self.opening -= 1
        self._reuse(conn)

    def _protocol(self) -> Connection:
        return Connection(self._done, self._lost)

    def _reuse(self, conn: Connection) -> None:
        now = time.monotonic()
        while self.backlog:
            scheduled = self.backlog.popleft()
            if now - scheduled > self.timeout_s:
                self.record(scheduled, "timeout")
                continue
            self.busy.add(conn)
            conn.send(self.request, scheduled)
            return
        self.idle.append(conn)

    def _done(self, conn: Connection, scheduled: float, outcome: str, version: str | None) -> None:
        self.busy.discard(conn)
        self.record(scheduled, outcome, version)
        if not conn.closed:
            self._reuse(conn)

    def _lost(self, conn: Connection) -> None:
        self.busy.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def sweep(self) -> None:
        """Time out requests in flight or waiting for a connection longer than the timeout."""
        now = time.monotonic()
        for conn in [c for c in self.busy if c.busy_since is not None and now - c.busy_since > self.timeout_s]:
            scheduled = conn.busy_since
            conn.abort()  # its late answer must not be counted, nor land on the next request
            self.busy.discard(conn)
            self.record(scheduled, "timeout")  # type: ignore[arg-type]
        while self.backlog and now - self.backlog[0] > self.timeout_s:
            self.record(self.backlog.popleft(), "timeout")

    def close(self) -> None:
        for conn in [*self.idle, *self.busy]:
            conn.abort()


def _pace(times: np.ndarray, fire: Any, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
    """Keep the schedule on a thread: ``time.sleep`` wakes within tens of microseconds, while event-loop
    timers (epoll's millisecond timeout) fire up to 1 ms late, which would add generator lag to every
    latency. The loop is handed each run of due sends in one thread-safe call."""
    i, n = 0, len(times)
    while i < n and not stop.is_set():
        now = time.monotonic()
        if times[i] > now:
            time.sleep(min(float(times[i]) - now, 0.05))
            continue
        j = int(np.searchsorted(times, now, side="right"))
        loop.call_soon_threadsafe(fire, i, j)
        i = j
    loop.call_soon_threadsafe(fire, n, n)


async def run_async(
    url: str,
    body: bytes,
    rate: float,
    duration: float,
    *,
    poisson: bool = False,
    timeout_ms: float = 1000.0,
    warmup_s: float = 0.0,
    max_connections: int = 256,
    headers: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run one open-loop load of ``rate`` req/s for ``duration`` s (plus ``warmup_s`` not counted)."""
    (result,) = await run_many_async(
        [(url, body, rate, headers or {})],
        duration,
        poisson=poisson,
        timeout_ms=timeout_ms,
        warmup_s=warmup_s,
        max_connections=max_connections,
        seed=seed,
    )
    return result


async def run_many_async(
    targets: list[tuple[Any, ...]],
    duration: float,
    *,
    poisson: bool = False,
    timeout_ms: float = 1000.0,
    warmup_s: float = 0.0,
    max_connections: int = 256,
    seed: int = 0,
    keep_latencies: bool = False,
) -> list[dict[str, Any]]:
    """Several loads at once, one per ``(url, body, rate[, headers])``: each its own schedule (seeded
    apart), connections and summary, all paced by one thread on one event loop, so fifty targets cost
    the generator what one does. ``keep_latencies`` adds each target's ``latencies_ms`` (successful
    answers), for percentiles over all of them together."""
    gens, times, owners = [], [], []
    for i, target in enumerate(targets):
        url, body, rate = target[:3]
        offsets = schedule(rate, duration + warmup_s, poisson=poisson, seed=seed + i)
        gens.append(_Generator(url, body, timeout_ms / 1000.0, max_connections, target[3] if len(target) > 3 else {}))
        times.append(offsets)
        owners.append(np.full(len(offsets), i, dtype=np.int32))
    order = np.argsort(np.concatenate(times), kind="stable")
    owner = np.concatenate(owners)[order]
    cpu0 = time.process_time()
    start = time.monotonic() + 0.02
    for gen in gens:
        gen.measure_from = start + warmup_s
    due = start + np.concatenate(times)[order]
    paced = asyncio.get_running_loop().create_future()

    def fire(i: int, j: int) -> None:
        for k in range(i, j):
            gens[owner[k]].dispatch(float(due[k]))
        if j >= len(due) and not paced.done():
            paced.set_result(None)

    stop = threading.Event()
    loop = asyncio.get_running_loop()
    pacer = threading.Thread(target=_pace, args=(due, fire, loop, stop), name="openloop-pacer", daemon=True)
    pacer.start()
    try:
        while not paced.done():
            for gen in gens:
                gen.sweep()
            await asyncio.wait([paced], timeout=SWEEP_S)
        give_up = time.monotonic() + timeout_ms / 1000.0 + 0.5
        while any(g.outstanding or g.opening for g in gens) and time.monotonic() < give_up:
            for gen in gens:
                gen.sweep()
            await asyncio.sleep(SWEEP_S)
        for gen in gens:
            for scheduled in [c.busy_since for c in gen.busy if c.busy_since is not None] + list(gen.backlog):
                gen.record(scheduled, "timeout")
    finally:
        stop.set()
        for gen in gens:
            gen.close()
        pacer.join(1.0)
    wall = time.monotonic() - start
    cpu_pct = round(100.0 * (time.process_time() - cpu0) / wall, 1) if wall > 0 else None
    results = []
    for target, gen in zip(targets, gens, strict=True):
        span = max(duration, gen.last_done - gen.measure_from)
        result = summarize(target[2], gen.latencies_ms, gen.outcomes, gen.versions, span, gen.refused_ms)
        result["duration_s"] = duration
        result["client_cpu_pct"] = cpu_pct  # the whole generator's, shared by its targets
        if keep_latencies:
            result["latencies_ms"] = gen.latencies_ms
        results.append(result)
    return results


def run(url: str, body: bytes, rate: float, duration: float, **kw: Any) -> dict[str, Any]:
    """Blocking :func:`run_async` on a fresh event loop (uvloop when installed: a cheaper generator)."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_async(url, body, rate, duration, **kw))


def _loop_factory() -> Any:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        return None


def run_many(targets: list[tuple[Any, ...]], duration: float, **kw: Any) -> list[dict[str, Any]]:
    """Blocking :func:`run_many_async`: a mixed load (e.g. one stream per model)."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_many_async(targets, duration, **kw))


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.openloop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000/predict")
    ap.add_argument("--body-file", required=True, type=Path, help="JSON request body, sent as is")
    ap.add_argument("--rate", required=True, type=float, help="requests per second")
    ap.add_argument("--duration", required=True, type=float, help="seconds of load (counted)")
    ap.add_argument("--poisson", action="store_true", help="Poisson arrivals instead of evenly spaced")
    ap.add_argument("--timeout-ms", type=float, default=1000.0, help="a request slower than this is a timeout")
    ap.add_argument("--warmup", type=float, default=0.0, help="seconds of load before counting starts")
    ap.add_argument("--max-connections", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="seed of the Poisson schedule")
    ap.add_argument("--header", action="append", default=[], help="extra header NAME:VALUE (repeatable)")
    ap.add_argument("--allow-remote", action="store_true", help="permit a non-loopback target")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args(argv)
    host = args.url.split("//", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    if not args.allow_remote and not is_loopback(host):
        ap.error(f"{host} is not a loopback address; pass --allow-remote to load-test another machine")
    headers = dict(h.split(":", 1) for h in args.header)
    result = run(
        args.url,
        args.body_file.read_bytes(),
        args.rate,
        args.duration,
        poisson=args.poisson,
        timeout_ms=args.timeout_ms,
        warmup_s=args.warmup,
        max_connections=args.max_connections,
        headers={k.strip(): v.strip() for k, v in headers.items()},
        seed=args.seed,
    )
    report.emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
