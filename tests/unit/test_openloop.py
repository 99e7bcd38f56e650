"""The open-loop generator: summary math, the schedule, and no coordinated omission against a real
(tiny, in-test) HTTP server that can stall, fail or never answer on purpose."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

from loadtest import openloop
from loadtest.httpclient import find_version
from loadtest.search import find_max_rate

ANSWER = b'{"predictions":[0.25],"model":"demo","model_version":"7","request_id":"r"}'


class TinyServer:
    """HTTP/1.1 keep-alive server on its own thread and loop. ``behave(n)`` picks what request n gets:
    ``"ok"``, ``"503"``, ``"stall"`` (blocks the whole server for ``stall_s``, like a GC pause or a model
    call on the event loop), or ``"hang"`` (never answers)."""

    def __init__(self, behave, stall_s: float = 0.3) -> None:
        self.behave = behave
        self.stall_s = stall_s
        self.count = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TinyServer:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predict"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()
        # Connections still open (the client's pool) have handler tasks: end them, or the interpreter
        # reports each as "Task was destroyed but it is pending!" at exit.
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                self.count += 1
                what = self.behave(self.count)
                if what == "hang":
                    await asyncio.sleep(60)
                if what == "stall":
                    time.sleep(self.stall_s)  # blocks the server's loop: nothing else is answered
                status, body = (b"503 Service Unavailable", b'{"error":{}}') if what == "503" else (b"200 OK", ANSWER)
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
def ok_server() -> Iterator[TinyServer]:
    with TinyServer(lambda n: "ok") as s:
        yield s


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert openloop.percentile(values, 50) == 50
    assert openloop.percentile(values, 99) == 99
    assert openloop.percentile(values, 100) == 100
    assert openloop.percentile([4.0], 99) == 4.0
    assert openloop.percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert openloop.percentile([], 50) is None


def test_summary_fields_counts_and_throughput():
    s = openloop.summarize(10.0, [3.0, 1.0, 2.0, 9.0], Counter(ok=4, timeout=1, **{"503": 2}), Counter({"1": 4}), 2.0)
    assert set(s) >= {"rate", "sent", "ok", "errors", "throughput", "p50_ms", "p95_ms", "p99_ms", "max_ms", "versions"}
    assert s["sent"] == 7 and s["ok"] == 4
    assert s["errors"] == {"503": 2, "timeout": 1}
    assert s["throughput"] == 2.0
    assert (s["p50_ms"], s["p99_ms"], s["max_ms"]) == (2.0, 9.0, 9.0)
    assert s["versions"] == {"1": 4}
    assert s["refused_p99_ms"] is None  # no refusal latencies given


def test_refusals_report_how_long_they_took():
    s = openloop.summarize(10.0, [3.0], Counter(ok=1, **{"503": 3}), Counter(), 1.0, [2.0, 40.0, 5.0])
    assert s["refused_p99_ms"] == 40.0


def test_fixed_schedule_is_evenly_spaced_and_exact():
    t = openloop.schedule(200, 2.0)
    assert len(t) == 400
    assert np.allclose(np.diff(t), 1 / 200)
    assert t[0] == 0 and t[-1] < 2.0


def test_poisson_schedule_has_exponential_gaps_and_replays_with_its_seed():
    t = openloop.schedule(1000, 20.0, poisson=True, seed=5)
    gaps = np.diff(t)
    assert abs(len(t) - 20_000) < 5 * np.sqrt(20_000)
    assert gaps.mean() == pytest.approx(1e-3, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV 1 (fixed: 0)
    assert t.max() < 20.0
    assert np.array_equal(t, openloop.schedule(1000, 20.0, poisson=True, seed=5))
    assert not np.array_equal(t, openloop.schedule(1000, 20.0, poisson=True, seed=6))


def test_schedule_is_bounded():
    with pytest.raises(ValueError):
        openloop.schedule(1e6, 1e4)
    with pytest.raises(ValueError):
        openloop.schedule(10, 0)


def test_every_request_is_answered_and_versions_counted(ok_server):
    s = openloop.run(ok_server.url, b'{"instances":[{}]}', 200, 1.0)
    assert s["sent"] == s["ok"] == 200
    assert s["errors"] == {}
    assert s["versions"] == {"7": 200}
    assert s["p50_ms"] < 20
    assert s["throughput"] == pytest.approx(200, rel=0.05)


def test_warmup_requests_are_sent_but_not_counted(ok_server):
    s = openloop.run(ok_server.url, b"{}", 100, 0.5, warmup_s=0.5)
    assert s["sent"] == 50
    assert ok_server.count == 100


def test_no_coordinated_omission_a_stall_shows_in_every_request_scheduled_during_it():
    """A 300 ms server stall at ~0.5 s into a 100 req/s run: a closed-loop client would record one slow
    request; measured from the scheduled send time, all ~30 requests due during the stall are slow."""
    with TinyServer(lambda n: "stall" if n == 50 else "ok", stall_s=0.3) as server:
        s = openloop.run(server.url, b"{}", 100, 1.5)
    assert s["ok"] == s["sent"] == 150
    assert s["max_ms"] >= 280
    assert s["p95_ms"] >= 100  # >= 8 of 150 requests waited behind the stall (about 30 did)
    assert s["p50_ms"] < 20


def test_errors_and_timeouts_are_counted_once_each():
    def behave(n: int) -> str:
        return "hang" if n == 5 else "503" if n % 10 == 0 else "ok"

    with TinyServer(behave) as server:
        s = openloop.run(server.url, b"{}", 100, 1.0, timeout_ms=300)
    assert s["sent"] == 100
    assert s["errors"]["timeout"] == 1
    assert s["errors"]["503"] >= 9
    assert s["ok"] + sum(s["errors"].values()) == s["sent"]


def test_find_version_reads_model_version_without_parsing():
    assert find_version(ANSWER) == "7"
    assert find_version(b'{"model_version": "12"}') == "12"
    assert find_version(b'{"model_version":null}') is None
    assert find_version(b'{"predictions":[1]}') is None


def test_rate_search_grows_then_bisects_to_the_capacity():
    capacity = 730.0
    seen: list[float] = []

    def measure(rate: float) -> dict:
        seen.append(rate)
        ok = rate <= capacity
        return {"ok": 10, "errors": {} if ok else {"timeout": 1}, "p99_ms": 10.0 if ok else 900.0}

    best, steps = find_max_rate(measure, 100, 50.0, max_steps=12)
    assert seen[:4] == [100, 200, 400, 800]
    assert best is not None and 0.92 * capacity <= best.rate <= capacity
    assert len(steps) <= 12


def test_a_failed_step_is_repeated_when_asked_and_one_stall_does_not_cap_the_search():
    capacity = 730.0
    stalls = {200.0}  # the machine stalls once, during the first step at 200/s

    def measure(rate: float) -> dict:
        ok = rate <= capacity and rate not in stalls
        stalls.discard(rate)
        return {"ok": 10, "errors": {} if ok else {"timeout": 1}, "p99_ms": 10.0 if ok else 900.0}

    stalls = {200.0}
    without, _ = find_max_rate(measure, 100, 50.0, max_steps=12)
    assert without is not None and without.rate < 200  # one stall capped the search below 200
    stalls = {200.0}
    best, steps = find_max_rate(measure, 100, 50.0, max_steps=12, retries=1)
    assert best is not None and 0.92 * capacity <= best.rate <= capacity
    assert [s.rate for s in steps][:3] == [100, 200, 200] and len(steps) <= 12
