"""`tandem rollout` against real workers, a real app server, a real sqlite registry and real load: a
healthy variant is ramped and promoted, a drill version failing 30% of requests is rolled back by
itself at the first step, and callers see no failure either way (safe canary)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from procs import tandem_argv, wait_ready

from shared import registry
from shared.settings import home_registry_uri

pytestmark = pytest.mark.slow

POLL = "0.3"
BODY = json.dumps({"instances": [{"amount": 42.0, "merchant_category": "travel", "channel": "web"}]}).encode()


@pytest.fixture(scope="module")
def v1_dir(demo_registry, tmp_path_factory) -> Path:
    return registry.download(demo_registry.uri, demo_registry.version, tmp_path_factory.mktemp("v1"))


@pytest.fixture
def reg(tmp_path, v1_dir) -> str:
    uri = home_registry_uri(tmp_path / "registry")
    (tmp_path / "registry").mkdir()
    assert registry.register(uri, "demo", v1_dir).version == "1"
    return uri


def rollout(reg: str, app_url: str, version: str, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = tandem_argv("rollout", "demo", version, "--registry-uri", reg, "--metrics-url", f"{app_url}/metrics", *extra)
    return subprocess.run(argv, capture_output=True, text=True, timeout=90)


class Load:
    """Requests at about 40/s until stopped, counting every answer by status (a closed loop with a pause:
    it must outlast a rollout whose length is not known in advance)."""

    def __init__(self, app_url: str) -> None:
        self.url = f"{app_url}/predict"
        self.codes: dict[int, int] = {}
        self.versions: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self._stop.wait(0.025):
                r = c.post(self.url, content=BODY, headers={"content-type": "application/json"})
                self.codes[r.status_code] = self.codes.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    v = r.json()["model_version"]
                    self.versions[v] = self.versions.get(v, 0) + 1

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join(10)
        return self.codes


def stack_on(stack, reg: str):
    w = stack.worker(reg, "--poll-interval", POLL)
    a = stack.app([w.endpoint])
    wait_ready(a)
    return w, a


def test_a_healthy_version_is_ramped_and_promoted_with_zero_failures(stack, reg, v1_dir, tmp_path):
    _, a = stack_on(stack, reg)
    v2 = registry.register(reg, "demo", shutil.copytree(v1_dir, tmp_path / "v2"), alias_if_first=None)
    load = Load(a.url)
    # A generous p99 guard: this box is shared, and this test is about the ramp, not a latency verdict.
    done = rollout(reg, a.url, v2.version, "--steps", "25,100", "--interval", "3", "--min-requests", "10",
                   "--max-p99-ratio", "5")  # fmt: skip
    codes = load.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "promoted demo v2 to production" in done.stdout
    aliases, tags = registry.model_state(reg, "demo")
    assert aliases.get("production") == v2.version and "canary" not in aliases
    assert tags["tandem.canary.percent"] == "0" and tags["tandem.rollout.state"] == "promoted"
    assert set(codes) == {200} and codes[200] > 100, codes
    assert set(load.versions) == {"1", "2"}, load.versions
    assert a.counter("tandem_variant_requests_total", model="demo", variant="canary", outcome="ok") >= 10
    status = subprocess.run(tandem_argv("rollout", "status", "demo", "--registry-uri", reg), capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert "rollout of v2: promoted" in status.stdout
    assert rollout(reg, a.url, v2.version).returncode == 0  # run again: it reports, and changes nothing


def test_a_failing_version_is_rolled_back_at_the_first_step_and_callers_see_no_failure(stack, reg, v1_dir, tmp_path):
    from tandem.demo import write_fault

    w, a = stack_on(stack, reg)
    drill = shutil.copytree(v1_dir, tmp_path / "drill")
    write_fault(drill, 30)
    bad = registry.register(reg, "demo", drill, alias_if_first=None)
    load = Load(a.url)
    done = rollout(reg, a.url, bad.version, "--steps", "20,50,100", "--interval", "30", "--min-requests", "20")
    codes = load.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rolled back demo v2 at 20%" in done.stdout and "--max-error-rate" in done.stdout
    aliases, tags = registry.model_state(reg, "demo")
    assert aliases.get("production") == "1" and "canary" not in aliases
    assert tags["tandem.canary.percent"] == "0" and tags["tandem.rollout.state"] == "rolled_back"
    assert set(codes) == {200} and codes[200] > 20, codes  # safe canary: production answered
    assert a.counter("tandem_variant_requests_total", model="demo", variant="canary", outcome="error") >= 1
    assert a.counter("tandem_canary_fallbacks_total", model="demo") >= 1
    assert w.counter("tandem_worker_requests_total", model="demo", outcome="ok") > 0
    assert set(load.versions) <= {"1", "2"}  # the drill's own successes answer as v2; its failures as v1
