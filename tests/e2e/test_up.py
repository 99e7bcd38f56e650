"""`tandem up` as a user runs it: ready line, a curl that works, everything gone after SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from procs import free_port, wait_for


def _children_of(home: str, port: int) -> list[str]:
    """Worker processes (their cache is under home) and the app server (its port) still running."""
    out = subprocess.run(
        ["pgrep", "-af", "--", f"--cache-dir {home}/cache|app --host 127.0.0.1 --port {port} "],
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_up_serves_two_models_prints_a_working_curl_for_each_and_stops_cleanly(tmp_path):
    home = str(tmp_path / "home")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem",
            "up",
            "--home",
            home,
            "--port",
            str(port),
            "--workers",
            "2",
            "--poll-interval",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TANDEM_LOG_FORMAT": "text"},
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "/v1/models      #" in line:  # the last line of the ready message
                break
        output = "".join(lines)
        assert "Tandem is ready in" in output, output[-3000:]
        curls = [shlex.split(line.strip()) for line in lines if "/predict -H" in line]
        assert [argv[2] for argv in curls] == [
            f"http://127.0.0.1:{port}/v1/models/{name}/predict" for name in ("demo", "churn")
        ]
        for argv in curls:
            url, payload = argv[2], argv[argv.index("-d") + 1]
            r = httpx.post(url, content=payload, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == url.split("/")[-2] and body["model_version"] == "1"
            assert len(body["predictions"]) == len(json.loads(payload)["instances"])
            assert 0.0 <= body["predictions"][0] <= 1.0
        served = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["models"]
        assert sorted(m["name"] for m in served) == ["churn", "demo"]

        def on_both_workers() -> bool:  # ready means each model has a live worker; the second may still load
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["models"]
            return all(sum(bool(w["live"]) for w in m["workers"]) == 2 for m in models)

        wait_for(on_both_workers, 30, what="both models on both workers")
        # /predict serves the first model named, demo.
        first = next(argv for argv in curls if "/demo/" in argv[2])
        r = httpx.post(f"http://127.0.0.1:{port}/predict", content=first[first.index("-d") + 1])
        assert r.status_code == 200 and r.json()["model"] == "demo", r.text
        assert len(_children_of(home, port)) == 3
        listing = subprocess.run(
            [sys.executable, "-m", "tandem", "models", "--home", home],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for name in ("demo", "churn"):
            (v1_line,) = [line for line in listing.splitlines() if line.startswith(f"{name} v1")]
            assert "production" in v1_line and v1_line.count("tcp://127.0.0.1:") == 2, listing
        # A model registered (with @production) while the stack runs is served without a restart.
        from shared import registry
        from shared.settings import home_registry_uri

        uri = home_registry_uri(Path(home))
        churn = registry.download(uri, registry.resolve(uri, "churn"), tmp_path / "dl")
        registry.register(uri, "late", churn)
        late_url = f"http://127.0.0.1:{port}/v1/models/late/predict"
        body = {"instances": registry.read_input_example(churn)["instances"][:1]}
        deadline = time.monotonic() + 20
        while httpx.post(late_url, json=body).status_code != 200:
            assert time.monotonic() < deadline, httpx.post(late_url, json=body).text
            time.sleep(0.2)
        # A crashed worker is restarted by the supervisor and rejoins the pool.
        victim = int(next(line for line in _children_of(home, port) if "--cache-dir" in line).split()[0])
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = httpx.get(f"http://127.0.0.1:{port}/v1/models/demo").json()["workers"]
            pids = [int(line.split()[0]) for line in _children_of(home, port) if "--cache-dir" in line]
            if victim not in pids and len(pids) == 2 and sum(w["alive"] for w in workers) == 2:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"worker not restarted: {_children_of(home, port)}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM) if proc.poll() is None else None
        code = proc.wait(30)
    assert code == 0
    deadline = time.monotonic() + 10
    while _children_of(home, port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _children_of(home, port) == []
    assert re.search(r"stopped", "".join(lines) + (proc.stdout.read() or ""))


def test_up_secure_needs_the_printed_key_and_its_workers_answer_no_stranger(tmp_path):
    """``tandem up --secure``: CURVE between the tiers and an API key printed once; without the key the
    HTTP API says 401, and a raw ZeroMQ client without a CURVE key gets nothing from a worker."""
    import msgpack
    import zmq

    home, port = tmp_path / "home", free_port()
    argv = [sys.executable, "-m", "tandem", "up", "--secure", "--home", str(home), "--port", str(port),
            "--workers", "1", "--models", "demo"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TANDEM_LOG_FORMAT": "text"}, start_new_session=True)  # fmt: skip
    lines: list[str] = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and "/v1/models      #" not in "".join(lines[-1:]):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        output = "".join(lines)
        keys = re.findall(r"^\s+(tdm_\S+)\s*$", output, re.M)
        assert len(keys) == 1, output[-3000:]
        (curl,) = [shlex.split(line.strip()) for line in lines if "/predict" in line and "curl" in line]
        url, payload = curl[2], curl[curl.index("-d") + 1]
        assert f"Authorization: Bearer {keys[0]}" in curl
        plain = {"content-type": "application/json"}
        assert httpx.post(url, content=payload, headers=plain).status_code == 401
        r = httpx.post(url, content=payload, headers={**plain, "Authorization": f"Bearer {keys[0]}"})
        assert r.status_code == 200, r.text
        assert keys[0] not in (home / "secure" / "api_keys.jsonl").read_text()  # only its hash is kept
        endpoint = re.search(r"workers \((tcp://[0-9.:]+)\)", output).group(1)
        with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as stranger:
            stranger.setsockopt(zmq.LINGER, 0)
            stranger.connect(endpoint)
            stranger.send_multipart([msgpack.packb({"v": 1, "kind": "ping", "id": "x", "budget_ms": 1000.0})])
            assert stranger.poll(1500) == 0, "a worker answered a client without a CURVE key"
    finally:
        os.killpg(proc.pid, signal.SIGTERM) if proc.poll() is None else None
        proc.wait(30)
