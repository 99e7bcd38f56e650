"""The app server's own overload, and one slow worker's tail: two scenarios of ``loadtest.scenarios``.

``overload-app``: ``tandem up --workers 2`` as a new user runs it, offered 600 req/s of 256-instance
bodies for 12 s (well past what one app server parses on a small machine) at a 1 s client timeout;
once with admission at the door (the default) and once with ``TANDEM_ADMISSION=false``. Status counts,
client timeouts, latency of the accepted, admission's refusals by reason, and how long the first request
after the flood takes.

``slow-worker``: three workers, one stalling 200 ms before 5% of its batches
(``--fault-stall-ms 200 --fault-stall-percent 5``), and two app servers on those same workers, one
hedging (the default) and one with ``--hedge-budget 0``; the same steady open-loop load on each in
turn, twice. p50/p99/p99.9 side by side, hedges sent and won, stalls the worker made.

``degrade``: ``tandem up --workers 2`` with and without admission at the door, for one-instance and
256-instance bodies: the held maximum searched (:mod:`loadtest.degrade`), then 1.5x and 3x of it offered;
the 200s kept as a share of the maximum, the refusals and how fast they came, client timeouts.

``http-bound``: the small demo model, where HTTP costs more than the model: one FastAPI process with
the model inside, Tandem with one app server, and Tandem with one app server per CPU sharing the port
(``tandem up --apps N``); the highest rate each holds within a 50 ms p99 and no errors, side by side in
one run (``loadtest.bench``'s search, short steps).

    python -m loadtest.scenarios overload-app|slow-worker|degrade|http-bound [--rate R] [--json OUT]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from loadtest import degrade as graceful
from loadtest import openloop
from loadtest.degrade import CLIENT_TIMEOUT_MS
from loadtest.scenarios import BODY, Up, _tandem, http_get_status
from loadtest.servers import free_port, http_get

BIG = json.dumps(
    {"instances": [{"amount": float(i), "merchant_category": "travel", "channel": "web"} for i in range(256)]}
).encode()


def summary(r: dict[str, Any]) -> dict[str, Any]:
    statuses = {"200": r["ok"], **r["errors"]}
    keys = ("rate", "sent", "p50_ms", "p99_ms", "p999_ms", "max_ms")
    return {**{k: r[k] for k in keys}, "statuses": statuses, "client_timeouts": r["errors"].get("timeout", 0)}


def metric(url: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in http_get(f"{url}/metrics")[1].decode().splitlines():
        key, _, value = line.rpartition(" ")
        base, _, rest = key.partition("{")
        if base == name and ",".join(sorted(rest.rstrip("}").split(","))) == (want if rest else ""):
            return float(value)
    return 0.0


def first_request_ms(url: str, body: bytes = BODY) -> tuple[int, float]:
    request = urllib.request.Request(f"{url}/predict", body, {"content-type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, round((time.monotonic() - t0) * 1000, 2)


def up_with(env: dict[str, str]) -> Up:
    """``tandem up --workers 2`` with ``env`` added to this process's environment while it starts."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Up("--workers", "2")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def overload_app(rate: float | None = None) -> dict[str, Any]:
    rate = rate or 600.0
    out: dict[str, Any] = {"scenario": "overload-app", "rate": rate, "seconds": 12, "instances": 256}
    for name, env in (("admission", {}), ("no_admission", {"TANDEM_ADMISSION": "false"})):
        up = up_with(env)
        try:
            first_request_ms(up.url, BIG)  # the version's spec described, encoders warm
            flood = openloop.run(
                f"{up.url}/predict", BIG, rate, 12.0, timeout_ms=CLIENT_TIMEOUT_MS, max_connections=int(rate) + 64
            )
            time.sleep(0.5)
            status, ms = first_request_ms(up.url)
            refusals = {r: metric(up.url, "tandem_admission_rejections_total", reason=r) for r in ("limit", "loop_lag")}
            out[name] = {**summary(flood), "refused_at_the_door": refusals, "first_after": {"status": status, "ms": ms}}
        finally:
            up.stop()
    return out


def degrade(rate: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": "degrade", "client_timeout_ms": CLIENT_TIMEOUT_MS}
    for body_name, body, start in (("1-instance", BODY, rate or 200.0), ("256-instance", BIG, (rate or 200.0) / 5)):
        for name, env in (("admission", {}), ("no_admission", {"TANDEM_ADMISSION": "false"})):
            up = up_with(env)
            try:
                first_request_ms(up.url, body)  # the version's spec described, encoders warm
                out[f"{body_name}/{name}"] = graceful.degrade(up.url, body, start=start)
            finally:
                up.stop()
    return out


def slow_worker(rate: float | None = None) -> dict[str, Any]:
    rate = rate or 150.0
    home = Path(tempfile.mkdtemp(prefix="tandem-scenario-"))
    subprocess.run([sys.executable, "-m", "tandem", "demo-model", "--home", str(home)], check=True, capture_output=True)
    procs, endpoints, metrics_ports = [], [], []
    for i in range(3):
        endpoint, mport = f"tcp://127.0.0.1:{free_port()}", free_port()
        endpoints.append(endpoint)
        metrics_ports.append(mport)
        stall = ["--fault-stall-ms", "200", "--fault-stall-percent", "5"] if i == 2 else []
        argv = ["worker", "--bind", endpoint, "--home", str(home), "--metrics-port", str(mport), *stall]
        procs.append(_tandem(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    apps = {}
    for name, flags in (("hedging", []), ("no_hedging", ["--hedge-budget", "0"])):
        port = free_port()
        argv = ["app", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", ",".join(endpoints), *flags]
        procs.append(_tandem(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        apps[name] = f"http://127.0.0.1:{port}"
    try:
        for url in apps.values():
            t0 = time.monotonic()
            while http_get_status(f"{url}/readyz") != 200 and time.monotonic() - t0 < 120:
                time.sleep(0.2)
        time.sleep(1.5)  # all three workers in both pools
        for url in apps.values():  # round trips enough for the hedging delay (a rolling p95)
            openloop.run(f"{url}/predict", BODY, 50, 2.0, timeout_ms=2000)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in apps}
        for _ in range(2):  # alternated, so drift on a shared machine hits both alike
            for name, url in apps.items():
                runs[name].append(openloop.run(f"{url}/predict", BODY, rate, 8.0, timeout_ms=2000, poisson=True))
        out: dict[str, Any] = {"scenario": "slow-worker", "rate": rate, "stall_ms": 200, "stall_percent": 5}
        for name, url in apps.items():
            hedges = {o: metric(url, "tandem_hedges_total", model="demo", outcome=o) for o in ("sent", "won", "lost")}
            out[name] = {"runs": [summary(r) for r in runs[name]], "hedges": hedges}
        sent_total = sum(r["sent"] for r in runs["hedging"]) + 100  # and the warm-up
        out["hedging"]["hedges_per_request"] = round(out["hedging"]["hedges"]["sent"] / sent_total, 4)
        p99 = {n: max(r["p99_ms"] for r in runs[n]) for n in apps}
        out["p99_hedging_over_no_hedging"] = round(p99["hedging"] / p99["no_hedging"], 3)
        stalls = float(
            next(
                (
                    line.split()[-1]
                    for line in http_get(f"http://127.0.0.1:{metrics_ports[2]}/metrics")[1].decode().splitlines()
                    if line.startswith("tandem_worker_fault_stalls_total ")
                ),
                0,
            )
        )
        out["stalls_made"] = stalls
        return out
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(30)


def http_bound(rate: float | None = None) -> dict[str, Any]:
    import argparse

    from loadtest import bench, engine

    del rate  # each configuration's rate is searched
    ctx = bench.bench_context(True)
    model = bench.Model(Path(".tandem/bench"), "small")
    cpus = ctx["server_cpus"]
    ctx["ceiling"] = engine.ceiling(model.onnx, model.row, cpus, intra_op_threads=len(cpus), device="cpu")
    args = argparse.Namespace(slo_p99_ms=50.0)
    results = {c: bench.measure_config(c, model, args, ctx) for c in ("baseline", "tandem_adaptive", "tandem_apps")}
    base = results["baseline"]["max_rate"] or float("nan")
    return {
        "scenario": "http-bound",
        "machine": ctx["machine"],
        "app_servers_in_tandem_apps": len(cpus),
        "results": results,
        "over_baseline": {c: round(r["max_rate"] / base, 2) for c, r in results.items()},
    }
