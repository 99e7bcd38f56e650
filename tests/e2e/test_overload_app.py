"""The app server sheds its own overload (issue 18): past what it can parse, callers get fast 503s with
Retry-After, never a client timeout, and the first request after the flood is answered at once."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from procs import sample, wait_for, wait_ready

from loadtest import openloop

pytestmark = pytest.mark.slow

SMALL = json.dumps({"instances": [{"amount": 42.0, "merchant_category": "travel", "channel": "web"}]}).encode()
BIG = json.dumps(
    {"instances": [{"amount": float(i), "merchant_category": "travel", "channel": "web"} for i in range(256)]}
).encode()
CLIENT_TIMEOUT_MS = 1000


def flood(url: str, body: bytes, rate: float, seconds: float) -> dict:
    # Connections enough for every request to be in flight for the whole client timeout: a smaller pool
    # would queue requests in the generator and report its own backlog as timeouts.
    return openloop.run(
        f"{url}/predict", body, rate, seconds, timeout_ms=CLIENT_TIMEOUT_MS, max_connections=int(rate) + 64
    )


def first_after(client: httpx.Client, url: str) -> float:
    """Seconds to answer one request shortly after the flood, on a connection opened before it."""
    time.sleep(0.5)
    t0 = time.monotonic()
    r = client.post(f"{url}/predict", content=SMALL, timeout=5)
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


CASES = {
    # Well past what one app server parses of these bodies on a small machine (about 150/s on 2 cores),
    # with the default 1 s request budget.
    "256-instance-bodies": (BIG, 600, (), 1000),
    # Ten times what the stack can compute (one worker answering at most ~50 req/s): the app server and
    # the worker shed together, each at its own door. A worker fills its queue up to the request's
    # budget, so the budget is set under the caller's timeout, as a caller with a 1 s timeout should.
    "small-bodies-10x": (SMALL, 500, ("--debug-delay-ms", "40", "--max-batch-size", "2"), 500),
}


@pytest.mark.parametrize("case", list(CASES))
def test_past_capacity_only_fast_503s_never_a_timeout(stack, demo_registry, case):
    body, rate, worker_flags, budget_ms = CASES[case]
    workers = [stack.worker(demo_registry.uri, *worker_flags) for _ in range(1 if worker_flags else 2)]
    a = stack.app([w.endpoint for w in workers], "--timeout-ms", str(budget_ms))
    wait_ready(a)
    client = httpx.Client()
    wait_for(lambda: client.post(f"{a.url}/predict", content=body).status_code == 200, 10, what="warm")
    load = flood(a.url, body, rate, 5.0)
    assert load["ok"] > 0, load
    assert set(load["errors"]) <= {"503", "504"}, load  # no "timeout", no connection error
    if not worker_flags:  # the app server is the bottleneck: it refused, at its own door
        metrics = httpx.get(f"{a.url}/metrics").text
        refused = sum(sample(metrics, "tandem_admission_rejections_total", reason=r) for r in ("limit", "loop_lag"))
        assert refused > 0 and load["errors"].get("503", 0) >= refused * 0.9, (refused, load)
    # Accepted ones answered within the request's budget, plus the generator's own lag on 2 busy cores
    # (latency counts from the scheduled send).
    assert load["p99_ms"] < min(budget_ms + 400, CLIENT_TIMEOUT_MS), load
    assert first_after(client, a.url) < 0.1  # nothing left queued: the next caller is served at once


def test_health_and_metrics_still_answer_and_503_carries_retry_after(stack, demo_registry):
    w = stack.worker(demo_registry.uri)
    a = stack.app([w.endpoint], "--admission-max-lag-ms", "0.001")  # a probe is always later than 1 µs
    wait_ready(a)
    answers = [httpx.post(f"{a.url}/predict", content=SMALL) for _ in range(20)]
    refused = [r for r in answers if r.status_code == 503]
    assert refused, [r.status_code for r in answers]
    assert refused[0].json()["error"]["code"] == "overloaded" and refused[0].headers["retry-after"] == "1"
    # Refused before the body is read: headers announcing a large body, and no body, get the 503.
    host, port = a.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 20}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 503")
    assert httpx.get(f"{a.url}/healthz").status_code == 200
    assert httpx.get(f"{a.url}/readyz").status_code == 200
    assert "tandem_admission_limit" in httpx.get(f"{a.url}/metrics").text


def test_past_the_held_maximum_it_keeps_serving_and_refuses_the_rest_fast(stack, demo_registry):
    """Graceful degradation: the rate of 256-instance bodies the stack holds is searched, then 1.5x and 3x
    of it offered; the stack keeps answering at least 90% of that rate with 200s, and everything else is
    a 503 before the caller's timeout (loadtest/degrade.py; ``loadtest.scenarios degrade`` runs the same
    with longer steps, and reports how long the refusals took)."""
    from loadtest.degrade import held_max, past_max

    workers = [stack.worker(demo_registry.uri) for _ in range(2)]
    a = stack.app([w.endpoint for w in workers])
    wait_ready(a)
    client = httpx.Client()
    wait_for(lambda: client.post(f"{a.url}/predict", content=BIG).status_code == 200, 10, what="warm")
    maximum, search = held_max(a.url, BIG, start=30, factor=1.4, seconds=1.5)
    assert maximum > 0, search
    for times, step in past_max(a.url, BIG, maximum, seconds=3.0).items():
        assert set(step["errors"]) <= {"503"}, (times, step)  # no timeout, no 504, no connection error
        assert step["ok_rate_over_max"] >= 0.9, (times, maximum, step)
    assert first_after(client, a.url) < 0.1
