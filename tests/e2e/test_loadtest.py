"""The load-test tools against real processes: openloop's command line on a Tandem stack, and the
baseline server speaking the same /predict JSON. Low rates, about 2 s of load each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
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


@pytest.mark.slow
def test_formats_command_with_tiny_durations(tmp_path: Path):
    """``python -m loadtest.formats``: every flavour's paths timed, both models served and searched. The
    SLO is loose on purpose: this checks the plumbing and the summary, not the machine's speed."""
    pytest.importorskip("xgboost")
    pytest.importorskip("lightgbm")
    from loadtest.formats import KINDS
    from loadtest.formats_report import render

    out = tmp_path / "formats.json"
    argv = [sys.executable, "-m", "loadtest.formats", "--quick", "--engine-s", "0.05", "--step-s", "0.5"]
    argv += ["--warmup-s", "0.2", "--max-steps", "2", "--low-s", "1", "--start-rate", "50", "--slo-p99-ms", "2000"]
    argv += ["--demo-epochs", "0", "--home", str(tmp_path / "home"), "--json", str(out)]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert set(summary) >= {"machine", "engine", "served", "served_xgboost_over_onnx", "threads", "elapsed_s"}
    assert summary["machine"]["cores"] >= 1 and summary["machine"]["loadavg_at_end"]
    assert [k["kind"] for k in summary["engine"]] == list(KINDS)
    for kind in summary["engine"]:
        for batch in ("1", "64"):
            rates = kind["rows_per_s"][batch]
            assert {"library", "mlflow_pyfunc", "runner_pyfunc"} <= set(rates)
            assert all(v > 0 for v in rates.values()), (kind["kind"], batch, rates)
            if kind["kind"] != "pyfunc":  # the direct call is offered for the tree and sklearn flavours only
                assert rates["runner_direct"] > 0
                assert kind["ratios"][batch]["faster_call"] in ("direct", "pyfunc")
        assert kind["chosen_call"] == ("pyfunc" if kind["kind"] == "pyfunc" else "direct")
    xgb = next(k for k in summary["engine"] if k["kind"] == "xgboost")
    if "onnx" in xgb["rows_per_s"]["64"]:  # onnxmltools installed: the same trees in ONNX Runtime
        assert xgb["onnx_max_abs_diff"] < 1e-4 and xgb["ratios"]["64"]["onnx_over_library_numpy"] > 0
    else:
        assert "not installed" in xgb["onnx_conversion"]
    assert [s["model"] for s in summary["served"]] == ["formats-xgboost", "demo"]
    for s in summary["served"]:
        assert s["max_rate"] > 0 and s["p99_ms"] <= 2000 and s["steps"]
        assert s["low_load"]["p50_ms"] > 0 and s["low_load"]["errors"] == {}
    assert summary["served_xgboost_over_onnx"] > 0
    text = render(summary)
    assert "| xgboost (direct) | 64 |" in text and "`formats-xgboost`" in text
