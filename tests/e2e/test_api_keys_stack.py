"""API keys with real processes: an app server started with ``--api-keys-file`` in front of a real
worker serving the demo model. No key or a wrong one: 401; the right one, either header: 200; probes and
/metrics open; a key over its rate: 429 with Retry-After while another key is served; a key added to the
file is admitted without a restart; a bad key file stops the server before it listens."""

from __future__ import annotations

import subprocess
import time

import httpx
from procs import free_port, sample, tandem_argv, wait_for, wait_ready

from app_server.api_keys import new_key

BODY = {"instances": [{"amount": 12.5, "merchant_category": "grocery"}]}
V2_BODY = {"inputs": [{"name": "amount", "shape": [1], "datatype": "FP64", "data": [12.5]}]}


def test_api_keys_guard_a_real_stack(stack, demo_registry, tmp_path):
    keys_file = tmp_path / "keys.jsonl"
    team = new_key(keys_file, "team")
    slow = new_key(keys_file, "slow", rps=2)
    w = stack.worker(demo_registry.uri)
    a = stack.app([w.endpoint], "--api-keys-file", str(keys_file))
    wait_ready(a)  # /readyz needs no key

    with httpx.Client(base_url=a.url, timeout=10) as c:
        for headers in ({}, {"Authorization": f"Bearer {team}x"}, {"X-API-Key": team[:-1]}, {"X-API-Key": "tdm_"}):
            r = c.post("/predict", json=BODY, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
        r = c.post("/v2/models/demo/infer", json=V2_BODY)
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
        assert c.get("/v1/models").status_code == 401

        for headers in ({"Authorization": f"Bearer {team}"}, {"X-API-Key": team}):
            r = c.post("/predict", json=BODY, headers=headers)
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"]) == 1
        assert c.get("/v1/models", headers={"X-API-Key": team}).status_code == 200

        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
            assert c.get(path).status_code == 200, path

        codes = []
        for _ in range(8):
            r = c.post("/predict", json=BODY, headers={"X-API-Key": slow})
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "rate_limited"
            assert c.post("/predict", json=BODY, headers={"X-API-Key": team}).status_code == 200  # unaffected
        assert 429 in codes and codes[0] == 200, codes

        late = new_key(keys_file, "late")
        t0 = time.monotonic()
        wait_for(lambda: c.post("/predict", json=BODY, headers={"X-API-Key": late}).status_code == 200, 10,
                 interval=0.05, what="the new key admitted")  # fmt: skip
        assert time.monotonic() - t0 < 3.0  # re-read within about a second, no restart
        assert a.alive

        text = c.get("/metrics").text
        assert sample(text, "tandem_api_key_requests_total", key="team", outcome="admitted") >= 11
        assert sample(text, "tandem_api_key_requests_total", key="slow", outcome="rate_limited") >= 1
        assert sample(text, "tandem_api_key_requests_total", key="", outcome="unknown") >= 3
        assert sample(text, "tandem_api_key_reloads_total", result="ok") >= 1
        for key in (team, slow, late):
            assert key not in text and key not in a.log()


def test_a_bad_key_file_stops_the_app_server_before_it_listens(tmp_path):
    keys_file = tmp_path / "keys.jsonl"
    keys_file.write_text("")
    port = free_port()
    argv = tandem_argv("app", "--host", "127.0.0.1", "--port", str(port), "--api-keys-file", str(keys_file))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"{keys_file}: no keys" in done.stderr
