"""Benchmark: what drift gauges and a 1 % payload log cost at the bench's held rate.

    python -m loadtest.observe_bench [--model small|large] [--rounds 2] [--json OUT]

The same Tandem configuration as the bench's ``tandem_adaptive`` (app server + one worker, adaptive
batching), measured with observability off (``--no-drift``, no payload log) and on (drift gauges over
every request, ``--payload-sample 0.01`` to a ``file://`` folder), alternating off/on for ``--rounds``
rounds so drift in the machine's load hits both alike. Each measurement is the bench's search for the
highest rate held with p99 within the SLO and no errors; the figures to read are the ratios on/off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import openloop, servers
from loadtest.bench import Model, bench_context
from loadtest.search import find_max_rate

OFF = ("--no-drift",)


def on_flags(log_dir: Path) -> tuple[str, ...]:
    return ("--drift", "--payload-sample", "0.01", "--payload-log", log_dir.as_uri())


def measure(name: str, flags: tuple[str, ...], model: Model, ctx: dict[str, Any], start: float, slo: float) -> dict:
    server = servers.start_tandem(
        name, model.uri, model.name, ctx["logs"], ctx["server_cpus"], max_batch_size=64, max_latency_ms=10.0,
        batcher="adaptive", intra_op_threads=0, device=ctx["device"], app_args=flags,
    )  # fmt: skip
    try:
        server.wait_ready()
        openloop.run(server.predict_url, model.body, 50, 1.0)

        def step(rate: float) -> dict[str, Any]:
            s = openloop.run(server.predict_url, model.body, rate, ctx["step_s"], warmup_s=ctx["warmup_s"])
            print(f"  {name:<4} {rate:>7.0f}/s  p99 {s['p99_ms']} ms  errors {s['errors']}", file=sys.stderr)
            server.settle()
            return s

        best, steps = find_max_rate(step, start, slo, max_steps=ctx["max_steps"])
    finally:
        server.stop()
    b = best.summary if best else {}
    tried = [[s.rate, s.summary["p99_ms"], s.summary["errors"]] for s in steps]
    return {"config": name, "max_rate": best.rate if best else 0.0, "p50_ms": b.get("p50_ms"),
            "p99_ms": b.get("p99_ms"), "steps": tried}  # fmt: skip


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fixed_rate(name: str, flags: tuple[str, ...], model: Model, ctx: dict[str, Any], rate: float, secs: float) -> dict:
    """Latency at one rate, and the app server's CPU per request: what the observer costs, measured in
    CPU time (which other processes on the machine disturb much less than a held rate)."""
    server = servers.start_tandem(
        name, model.uri, model.name, ctx["logs"], ctx["server_cpus"], max_batch_size=64, max_latency_ms=10.0,
        batcher="adaptive", intra_op_threads=0, device=ctx["device"], app_args=flags,
    )  # fmt: skip
    try:
        server.wait_ready()
        openloop.run(server.predict_url, model.body, rate, 2.0)
        app_pid = server.procs[1].pid
        before = cpu_s(app_pid)
        s = openloop.run(server.predict_url, model.body, rate, secs)
        used = cpu_s(app_pid) - before
    finally:
        server.stop()
    out = {"config": name, "rate": rate, "ok": s["ok"], "errors": s["errors"], "p50_ms": s["p50_ms"],
           "p99_ms": s["p99_ms"], "app_cpu_us_per_request": round(used / max(s["ok"], 1) * 1e6, 1)}  # fmt: skip
    print(f"  {name:<4} {rate:>6.0f}/s  p50 {s['p50_ms']} p99 {s['p99_ms']} ms  app CPU "
          f"{out['app_cpu_us_per_request']} us/request", file=sys.stderr)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.observe_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("small", "large"), default="small")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slo-p99-ms", type=float, default=50.0)
    ap.add_argument("--start-rate", type=float, default=500.0)
    ap.add_argument("--home", type=Path, default=Path(".tandem/observe-bench"))
    ap.add_argument("--client-cpus")
    ap.add_argument("--server-cpus")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--fixed-rate", type=float, help="instead of searching: this rate, app CPU per request")
    ap.add_argument("--seconds", type=float, default=10.0, help="with --fixed-rate: each measurement's length")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    ctx = bench_context(True, args.client_cpus, args.server_cpus, "cpu")
    args.home.mkdir(parents=True, exist_ok=True)
    model = Model(args.home, args.model)  # a first run registers it, with its reference profile
    log_dir = Path(tempfile.mkdtemp(prefix="tandem-payload-"))
    runs: list[dict[str, Any]] = []
    start = args.start_rate
    for _ in range(args.rounds):
        for name, flags in (("off", OFF), ("on", on_flags(log_dir))):
            if args.fixed_rate:
                runs.append(fixed_rate(name, flags, model, ctx, args.fixed_rate, args.seconds))
                continue
            r = measure(name, flags, model, ctx, start, args.slo_p99_ms)
            runs.append(r)
            start = max(r["max_rate"] * 0.7, 1.0)  # the next search starts near what was held
    logged = sum(1 for _ in log_dir.rglob("payload-*.jsonl.gz"))
    if args.fixed_rate:
        keys = ("p50_ms", "p99_ms", "app_cpu_us_per_request")
        fixed = {k: {c: statistics.median(r[k] for r in runs if r["config"] == c) for c in ("off", "on")} for k in keys}
        result = {"machine": ctx["machine"], "model": model.name, "rounds": args.rounds, "rate": args.fixed_rate,
                  "runs": runs, **fixed, "ratio_on_off": {k: round(fixed[k]["on"] / fixed[k]["off"], 3) for k in keys},
                  "elapsed_s": round(time.monotonic() - t0, 1)}  # fmt: skip
        text = json.dumps(result, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
        return 0

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["config"] == name and r[key] is not None)

    result = {
        "machine": ctx["machine"], "model": model.name, "rounds": args.rounds, "runs": runs,
        "held_rate": {"off": med("off", "max_rate"), "on": med("on", "max_rate")},
        "p99_ms": {"off": med("off", "p99_ms"), "on": med("on", "p99_ms")},
        "payload_files": logged, "elapsed_s": round(time.monotonic() - t0, 1),
    }  # fmt: skip
    result["ratio_on_off"] = {
        "held_rate": round(result["held_rate"]["on"] / result["held_rate"]["off"], 3),
        "p99": round(result["p99_ms"]["on"] / result["p99_ms"]["off"], 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
