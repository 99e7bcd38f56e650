"""Operational scenarios under steady open-loop load, each on a stack of its own, with a JSON report.

``rollout``: ``tandem up --poll-interval 1``; a ``--variant`` version is registered, then promoted
mid-load; p99 before, during and after the swap, and how long until every worker serves it.
``failover``: ``tandem up --workers 3``; one worker is killed with SIGKILL mid-load; failed requests,
p99 before/during/after, ``/readyz`` while it happens, and the supervisor restarting the worker.
``overload``: three deliberately slow workers (``--debug-delay-ms``) offered ten times their
capacity; which statuses come back, the shed rate, and how fast the stack serves normally afterwards.
``overload-app``, ``slow-worker``, ``degrade`` and ``http-bound`` (the app server's own overload, hedged
requests, graceful degradation past the held maximum, the HTTP-bound case): :mod:`loadtest.tail_scenarios`.

    python -m loadtest.scenarios rollout|failover|overload|overload-app|slow-worker|degrade|http-bound [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from loadtest import openloop, report
from loadtest.servers import free_port, http_get

BUDGET_MS = 500
BODY = json.dumps({"instances": [{"amount": 42.0, "merchant_category": "travel", "channel": "web"}]}).encode()


def _tandem(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tandem", *args], stdin=subprocess.DEVNULL, start_new_session=True, **kw
    )


class Up:
    """``tandem up`` in a temporary home, on a free port."""

    def __init__(self, *flags: str) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="tandem-scenario-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (self.home / "up.log").open("wb")
        t0 = time.monotonic()
        self.proc = _tandem(
            "up", "--home", str(self.home), "--port", str(self.port), *flags, stdout=self.log, stderr=subprocess.STDOUT
        )
        while http_get_status(f"{self.url}/readyz") != 200:
            if self.proc.poll() is not None or time.monotonic() - t0 > 180:
                raise RuntimeError(f"tandem up did not get ready; see {self.home / 'up.log'}")
            time.sleep(0.2)
        self.ready_s = time.monotonic() - t0

    def workers(self) -> list[dict[str, Any]]:
        return json.loads(http_get(f"{self.url}/v1/models/demo")[1])["workers"]

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)


def http_get_status(url: str) -> int:
    try:
        return http_get(url, timeout=1.0)[0]
    except OSError:
        return 0


def load(url: str, rate: float, seconds: float, **kw: Any) -> dict[str, Any]:
    return openloop.run(f"{url}/predict", BODY, rate, seconds, timeout_ms=kw.pop("timeout_ms", 2000), **kw)


def in_background(fn: Any, *args: Any, **kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(fn(*args, **kw)), daemon=True)
    thread.start()
    return thread, out


def brief(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("rate", "sent", "ok", "errors", "p50_ms", "p99_ms", "max_ms", "versions")
    return {k: r[k] for k in keys}


def rollout(rate: float) -> dict[str, Any]:
    up = Up("--poll-interval", "1", "--workers", "2")
    try:
        steady = load(up.url, rate, 8.0)
        made = subprocess.run(
            [sys.executable, "-m", "tandem", "demo-model", "--variant", "--home", str(up.home)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        version = made.split("version")[1].split()[0]
        thread, during = in_background(load, up.url, rate, 12.0)
        time.sleep(2.0)
        t_cmd = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "tandem", "promote", "demo", version, "--home", str(up.home)],
            check=True,
            capture_output=True,
        )
        promoted = time.monotonic()  # the alias moves at the very end of the command
        command_s = promoted - t_cmd
        switched = None
        while time.monotonic() - promoted < 30:
            if all(w["live"] == version for w in up.workers()):
                switched = time.monotonic() - promoted
                break
            time.sleep(0.1)
        thread.join(60)
        after = load(up.url, rate, 5.0)
        return {
            "scenario": "rollout",
            "up_ready_s": round(up.ready_s, 1),
            "new_version": version,
            "promote_command_s": round(command_s, 2),
            "all_workers_switched_after_promote_s": None if switched is None else round(switched, 2),
            "steady": brief(steady),
            "during_swap": brief(during),
            "after": brief(after),
            "p99_during_over_steady": round(during["p99_ms"] / steady["p99_ms"], 2),
        }
    finally:
        up.stop()


def failover(rate: float) -> dict[str, Any]:
    up = Up("--workers", "3")
    try:
        before = load(up.url, rate, 6.0)
        victim = next(iter(_worker_pids(up.home)))
        thread, during = in_background(load, up.url, rate, 8.0)
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        ready = []
        while thread.is_alive():
            ready.append(http_get_status(f"{up.url}/readyz"))
            time.sleep(0.1)
        back = None
        while time.monotonic() - killed < 60:
            if sum(w["alive"] for w in up.workers()) == 3:
                back = time.monotonic() - killed
                break
            time.sleep(0.2)
        after = load(up.url, rate, 6.0)
        return {
            "scenario": "failover",
            "up_ready_s": round(up.ready_s, 1),
            "before": brief(before),
            "during_kill": brief(during),
            "after": brief(after),
            "readyz_during": {str(k): ready.count(k) for k in set(ready)},
            "three_workers_again_after_s": back,
        }
    finally:
        up.stop()


def _worker_pids(home: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "--", f"--cache-dir {home}/cache"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def overload(capacity_factor: float = 10.0) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="tandem-scenario-"))
    subprocess.run([sys.executable, "-m", "tandem", "demo-model", "--home", str(home)], check=True, capture_output=True)
    procs, endpoints = [], []
    # Slow enough that ten times their capacity (600 req/s) stays well inside what one app server and
    # the generator can handle on 2 cores: the flood then tests shedding, not a saturated machine.
    delay_ms, batch = 50, 1
    for _ in range(3):
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        endpoints.append(endpoint)
        procs.append(
            _tandem(
                "worker",
                "--bind",
                endpoint,
                "--home",
                str(home),
                "--debug-delay-ms",
                str(delay_ms),
                "--max-batch-size",
                str(batch),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs.append(
        _tandem(
            "app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            ",".join(endpoints),
            "--timeout-ms",
            str(BUDGET_MS),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    try:
        t0 = time.monotonic()
        while http_get_status(f"{url}/readyz") != 200 and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        time.sleep(1.0)  # all three workers in the pool
        capacity = 3 * batch * 1000 / delay_ms
        steady = load(url, capacity * 0.3, 4.0)
        # Enough connections for every request of the flood to be in flight for its whole budget: a
        # smaller pool would queue requests in the generator and report its own backlog as timeouts.
        rate = capacity * capacity_factor
        flood = load(url, rate, 5.0, timeout_ms=5000, max_connections=int(rate * BUDGET_MS / 1000) + 256)
        time.sleep(1.0)
        t_first = time.monotonic()
        request = urllib.request.Request(f"{url}/predict", BODY, {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                first_status, first_body = r.status, ""
        except urllib.error.HTTPError as exc:
            first_status, first_body = exc.code, exc.read().decode(errors="replace")[:300]
        first_ms = (time.monotonic() - t_first) * 1000
        after = load(url, capacity * 0.3, 4.0)
        shed = flood["errors"].get("503", 0)
        return {
            "scenario": "overload",
            "capacity_req_s": capacity,
            "steady": brief(steady),
            "flood": brief(flood),
            "shed_rate": round(shed / flood["sent"], 3),
            "statuses_in_flood": sorted(["200", *flood["errors"]]) if flood["ok"] else sorted(flood["errors"]),
            "first_request_1s_after": {"status": first_status, "ms": round(first_ms, 2), "body": first_body},
            "after": brief(after),
            "server_budget_ms": BUDGET_MS,
        }
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.scenarios", description=__doc__.split("\n\n")[0])
    names = ["rollout", "failover", "overload", "overload-app", "slow-worker", "degrade", "http-bound"]
    ap.add_argument("scenario", choices=names)
    ap.add_argument("--rate", type=float, default=None, help="steady rate (default 100 rollout, 150 failover)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.scenario == "rollout":
        result = rollout(args.rate or 100.0)
    elif args.scenario == "failover":
        result = failover(args.rate or 150.0)
    elif args.scenario in ("overload-app", "slow-worker", "degrade", "http-bound"):
        from loadtest import tail_scenarios

        run = {
            "overload-app": tail_scenarios.overload_app,
            "slow-worker": tail_scenarios.slow_worker,
            "degrade": tail_scenarios.degrade,
            "http-bound": tail_scenarios.http_bound,
        }[args.scenario]
        result = run(args.rate)
    else:
        result = overload()
    report.emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
