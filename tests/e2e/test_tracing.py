"""A request id travels app -> worker -> app and names the request in both tiers' logs."""

from __future__ import annotations

import contextlib
import json

import httpx
from procs import wait_for, wait_ready

BODY = {"instances": [{"amount": 12.0, "merchant_category": "fuel"}]}


def log_events(proc) -> list[dict]:
    events = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def events_for(proc, request_id: str) -> list[dict]:
    return [e for e in log_events(proc) if e.get("request_id") == request_id]


def test_a_slow_request_can_be_found_by_its_id_in_both_tiers(stack, demo_registry):
    # Default settings: only requests slower than slow_request_ms (250) are logged; this worker is slow.
    w = stack.worker(demo_registry.uri, "--debug-delay-ms", "300")
    a = stack.app([w.endpoint])
    wait_ready(a)
    fast_id, slow_id = "fast-0001", "slow-trace-42"
    r = httpx.post(f"{a.url}/predict", json=BODY, headers={"X-Request-ID": slow_id}, timeout=5)
    assert r.status_code == 200 and r.headers["x-request-id"] == slow_id
    wait_for(lambda: events_for(w, slow_id) and events_for(a, slow_id), 5, what="log lines for the slow request")
    (worker_line,) = events_for(w, slow_id)
    (app_line,) = events_for(a, slow_id)
    assert worker_line["model_version"] == app_line["model_version"] == "1"
    assert worker_line["infer_ms"] >= 300 and worker_line["batch_size"] == 1 and "queue_ms" in worker_line
    assert app_line["duration_ms"] >= 300 and app_line["level"] == "info"
    assert events_for(w, fast_id) == []


def test_log_requests_logs_every_request_in_both_tiers(stack, demo_registry):
    w = stack.worker(demo_registry.uri, "--log-requests")
    a = stack.app([w.endpoint], "--log-requests")
    wait_ready(a)
    ids = [f"every-{i}" for i in range(5)]
    for rid in ids:
        assert httpx.post(f"{a.url}/predict", json=BODY, headers={"X-Request-ID": rid}).status_code == 200
    wait_for(lambda: all(events_for(w, rid) and events_for(a, rid) for rid in ids), 5, what="one line per request")
    assert all(e["duration_ms"] < 250 for rid in ids for e in events_for(a, rid))
