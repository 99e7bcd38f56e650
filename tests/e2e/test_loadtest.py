"""The load-test tools against real processes: openloop's command line on a Tandem stack, and the
baseline server speaking the same /predict JSON. Low rates, about 2 s of load each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from procs import wait_ready

from loadtest import openloop, servers
from shared import registry

FIELDS = {"rate", "sent", "ok", "errors", "throughput", "p50_ms", "p95_ms", "p99_ms", "max_ms", "versions"}


def test_openloop_command_against_a_tandem_stack(stack, demo_registry, tmp_path: Path):
    w = stack.worker(demo_registry.uri)
    a = stack.app([w.endpoint])
    wait_ready(a)
    example = httpx.get(f"{a.url}/v1/models").json()["models"][0]["input_example"]
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"instances": example[:1]}))
    out = tmp_path / "summary.json"
    argv = [sys.executable, "-m", "loadtest.openloop", "--url", f"{a.url}/predict", "--body-file", str(body)]
    argv += ["--rate", "40", "--duration", "2", "--poisson", "--timeout-ms", "2000", "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    assert json.loads(done.stdout) == summary
    assert set(summary) >= FIELDS
    assert summary["rate"] == 40
    assert summary["sent"] > 40 and summary["ok"] == summary["sent"]
    assert summary["errors"] == {}
    assert summary["versions"] == {"1": summary["ok"]}
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"]


def test_openloop_refuses_a_non_loopback_target(tmp_path: Path):
    body = tmp_path / "body.json"
    body.write_text("{}")
    argv = [sys.executable, "-m", "loadtest.openloop", "--url", "http://192.0.2.1/predict", "--body-file", str(body)]
    done = subprocess.run([*argv, "--rate", "1", "--duration", "1"], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "loopback" in done.stderr


def test_baseline_server_answers_like_tandem(demo_registry, tmp_path: Path):
    model_dir = registry.download(demo_registry.uri, demo_registry.version, tmp_path / "dl")
    instances = registry.read_input_example(model_dir)["instances"]
    server = servers.start_baseline(
        "baseline", model_dir, tmp_path / "logs", {0}, workers=1, intra_op_threads=1, version="1"
    )
    try:
        server.wait_ready(60)
        r = httpx.post(server.predict_url, json={"instances": instances}, headers={"X-Request-ID": "b-1"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert set(answer) == {"predictions", "model", "model_version", "request_id"}
        assert answer["model_version"] == "1" and answer["request_id"] == "b-1"
        assert len(answer["predictions"]) == len(instances)
        bad = httpx.post(server.predict_url, json={"instances": [{"amount": "x"}]})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"
        s = openloop.run(server.predict_url, json.dumps({"instances": instances[:1]}).encode(), 50, 1.0)
        assert s["ok"] == s["sent"] == 50 and s["versions"] == {"1": 50}
    finally:
        server.stop()
