"""`tandem up --apps N` (issue 18): N app server processes share one port (SO_REUSEPORT), each serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from procs import free_port, sample, wait_for

pytestmark = pytest.mark.slow

BODY = json.dumps({"instances": [{"amount": 42.0, "merchant_category": "travel", "channel": "web"}]}).encode()


def predicted(url: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"connection": "close"}).text
    return sample(text, "tandem_http_requests_total", code="200", model="demo", route="/predict")


def test_up_with_two_apps_shares_the_port_and_both_answer(tmp_path, demo_registry):
    port = free_port()
    argv = [sys.executable, "-m", "tandem", "up", "--home", str(tmp_path / "home"), "--port", str(port)]
    argv += ["--registry-uri", demo_registry.uri, "--models", "demo", "--workers", "1", "--apps", "2"]
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=os.environ, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "ready in" in (tmp_path / "up.log").read_text(), 90, what="tandem up ready")
        apps = [c for c in psutil.Process(proc.pid).children() if " app " in " ".join(c.cmdline())]
        assert len(apps) == 2 and all("--reuse-port" in c.cmdline() for c in apps)
        listening = {c.pid for c in apps for conn in c.net_connections("tcp") if conn.laddr.port == port}
        assert listening == {c.pid for c in apps}  # both bound to the one port
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30, what="ready")
        # The kernel spreads new connections over both: each answers some of 41 fresh connections (an odd
        # number, so the two processes' counts always differ and a set of scraped counts tells them apart).
        for _ in range(41):
            assert httpx.post(f"{url}/predict", content=BODY, headers={"connection": "close"}).status_code == 200
        # Each process counts its own: scraped over fresh connections, two different counts that add up.
        counts = {predicted(url) for _ in range(30)}
        assert len(counts) == 2 and 0 not in counts and sum(counts) == 41, counts
        assert "2 app servers" in (tmp_path / "up.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        time.sleep(0.2)
