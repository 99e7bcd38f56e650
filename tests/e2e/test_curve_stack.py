"""CURVE with real processes: a worker and an app server holding keys serve as usual, a raw ZeroMQ client
without a key gets nothing from the worker (which counts it), and a bad key file or half the settings
stops either process at start with a line naming what is wrong."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import zmq
from procs import free_port, tandem_argv, wait_for, wait_ready

from shared import curve, protocol
from shared.protocol import Kind


def make_keys(root: Path) -> dict[str, str]:
    """Paths of the worker's pair and public key, the app's pair, and a directory authorising the app."""
    worker_public, worker_secret = curve.generate_pair(root / "made", "worker")
    app_public, app_secret = curve.generate_pair(root / "made", "app")
    authorized = root / "authorized"
    authorized.mkdir()
    shutil.copy(app_public, authorized / app_public.name)
    paths = {"worker": worker_secret, "worker_public": worker_public, "app": app_secret, "authorized": authorized}
    return {k: str(v) for k, v in paths.items()}


def test_curve_stack_serves_and_a_keyless_client_gets_nothing(stack, demo_registry, tmp_path: Path) -> None:
    k = make_keys(tmp_path)
    w = stack.worker(demo_registry.uri, "--curve-secret-key", k["worker"], "--curve-authorized-dir", k["authorized"])
    a = stack.app([w.endpoint], "--curve-secret-key", k["app"], "--curve-worker-key", k["worker_public"])
    wait_ready(a)
    body = {"instances": [{"amount": 12.5, "merchant_category": "grocery"}]}
    r = httpx.post(f"{a.url}/predict", json=body)
    assert r.status_code == 200, r.text
    assert 0 <= r.json()["predictions"][0] <= 1

    before = w.counter("tandem_worker_auth_failures_total", reason="handshake")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(w.endpoint)
    try:
        sock.send_multipart(protocol.request(Kind.PING, "p"))
        assert sock.poll(1000) == 0, "a client without a key got an answer"
    finally:
        sock.close(0)
        ctx.term()
    wait_for(lambda: w.counter("tandem_worker_auth_failures_total", reason="handshake") > before, 5, what="counted")
    assert httpx.post(f"{a.url}/predict", json=body).status_code == 200  # the app server was not disturbed


def test_bad_keys_stop_the_process_at_start(demo_registry, tmp_path: Path) -> None:
    k = make_keys(tmp_path)
    empty = tmp_path / "empty.key_secret"
    empty.write_text("")
    damaged = tmp_path / "damaged.key"
    damaged.write_text('metadata\ncurve\n    public-key = "tooshort"\n')
    nothing = tmp_path / "no-keys"
    nothing.mkdir()
    bind = ["--bind", f"tcp://127.0.0.1:{free_port()}", "--registry-uri", demo_registry.uri]
    key, authorized = "--curve-secret-key", ("--curve-authorized-dir", k["authorized"])
    cases = {
        # argv: what the one error line must name
        ("worker", *bind, key, str(empty), *authorized): str(empty),
        ("worker", *bind, key, k["worker_public"], *authorized): "holds only a public key",
        ("worker", *bind, key, k["worker"], "--curve-authorized-dir", str(nothing)): str(nothing),
        ("worker", *bind, *authorized): "--curve-secret-key",
        ("app", "--port", str(free_port()), key, k["app"], "--curve-worker-key", str(damaged)): str(damaged),
        ("app", "--port", str(free_port()), key, k["app"]): "--curve-worker-key",
    }
    # All at once: each is an interpreter start, and none of them gets further than reading its keys.
    procs = {argv: subprocess.Popen(tandem_argv(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in cases}  # fmt: skip
    for argv, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 2, f"{argv}: exit {proc.returncode}\n{out[-2000:]}{err[-2000:]}"
        assert err.startswith("error: ") and cases[argv] in err, f"{argv}: {err[-2000:]}"
        assert "Traceback" not in err
