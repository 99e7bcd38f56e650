"""Many models on one worker: the rate it holds under a mixed Poisson load, p99 per model, memory.

For each count N (e.g. 1, 2, 10, 50): N small models (the fraud demo's shape, each an untrained network
of its own seed: accuracy is not what is measured) on one worker and one app server, every model
offered an equal share of the load, each as its own Poisson stream. The held rate is the highest total
with the p99 of all requests together within the SLO and no error anywhere (the bench's search, a
failed step measured once more before it counts: single stalls of this VM otherwise decide the
figure). Reported beside it: the p99 of each model at that rate (worst, median, best; with 50 models
each has only a few dozen samples per step, so its "p99" is close to its maximum), and the worker's
resident memory with the sum of what its loaded versions measured. N = 1 is the single-model
reference the others compare to.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from loadtest import openloop, report, servers
from loadtest.search import find_max_rate
from shared import registry
from shared.settings import home_registry_uri

PREFIX = "bench-m"


def ensure_models(home: Path, n: int) -> tuple[str, list[str], list[bytes]]:
    """``n`` registered models ``bench-m00``.. (created once in the bench home, then reused), with a
    request body each."""
    from tandem.demo import register_demo

    uri = home_registry_uri(home)
    names = [f"{PREFIX}{i:02d}" for i in range(n)]
    bodies = []
    for i, name in enumerate(names):
        ref = registry.resolve_alias(uri, name, "production")
        if ref is None:
            print(f"registering {name} (first run only)...", file=sys.stderr)
            ref = register_demo(uri, "small", seed=100 + i, rows=2000, epochs=0, name=name)
        folder = registry.download(uri, ref, home / "cache")
        instance = registry.read_input_example(folder)["instances"][0]
        bodies.append(json.dumps({"instances": [instance]}).encode())
    return uri, names, bodies


def worker_memory_mb(server: servers.Server) -> dict[str, float]:
    """The worker process's resident memory, and what its loaded versions measured at load."""
    pid = server.procs[0].pid
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = 0
    _, text = servers.http_get(server.metrics_url or "", timeout=5)
    versions = sum(
        float(line.rpartition(" ")[2])
        for line in text.decode().splitlines()
        if line.startswith("tandem_model_resident_bytes{")
    )
    return {"worker_rss_mb": round(rss / 2**20, 1), "versions_mb": round(versions / 2**20, 1)}


def measure(n: int, home: Path, ctx: dict[str, Any], slo_p99_ms: float) -> dict[str, Any]:
    uri, names, bodies = ensure_models(home, n)
    server = servers.start_tandem(
        f"models_{n}",
        uri,
        ",".join(names),
        ctx["logs"],
        ctx["server_cpus"],
        max_batch_size=64,
        max_latency_ms=10.0,
        batcher="adaptive",
        intra_op_threads=0,
    )
    try:
        server.wait_ready()
        urls = [f"{server.base_url}/v1/models/{name}/predict" for name in names]
        openloop.run_many([(u, b, 20.0) for u, b in zip(urls, bodies, strict=True)], 1.0)  # warm every path

        def step(rate: float) -> dict[str, Any]:
            targets = [(u, b, rate / n) for u, b in zip(urls, bodies, strict=True)]
            runs = openloop.run_many(
                targets, ctx["step_s"], poisson=True, warmup_s=ctx["warmup_s"], keep_latencies=True
            )
            p99s = sorted(r["p99_ms"] for r in runs if r["p99_ms"] is not None)
            pooled = sorted(ms for r in runs for ms in r.pop("latencies_ms"))
            errors: dict[str, int] = {}
            for r in runs:
                for k, v in r["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            summary = {
                "rate": rate,
                "ok": sum(r["ok"] for r in runs),
                "errors": errors,
                "p99_ms": openloop.percentile(pooled, 99),
                "p99_ms_by_model": {"worst": p99s[-1], "median": p99s[len(p99s) // 2], "best": p99s[0]}
                if p99s
                else None,
            }
            worst = p99s[-1] if p99s else None
            print(f"  models={n:<3} {rate:>7.0f}/s  p99 {summary['p99_ms']} ms (worst model {worst})  errors {errors}",
                  file=sys.stderr)  # fmt: skip
            server.settle()
            return summary

        best, steps = find_max_rate(step, 400.0, slo_p99_ms, max_steps=ctx["max_steps"] + 3, retries=1)
        memory = worker_memory_mb(server)
    finally:
        server.stop()
    b = best.summary if best else {}
    return {
        "models": n,
        "max_rate": best.rate if best else 0.0,
        "p99_ms": b.get("p99_ms"),
        "p99_ms_by_model": b.get("p99_ms_by_model"),
        **memory,
        "steps": [[s.rate, s.summary["p99_ms"], s.summary["errors"]] for s in steps],
    }


def main(argv: list[str] | None = None) -> int:
    """Standalone: ``python -m loadtest.multimodel --counts 1,2,10,50`` (``bench --multi-model`` runs the same)."""
    ap = argparse.ArgumentParser(prog="python -m loadtest.multimodel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1,2,10,50")
    ap.add_argument("--slo-p99-ms", type=float, default=50.0)
    ap.add_argument("--home", type=Path, default=Path(".tandem/bench"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from loadtest.bench import bench_context

    ctx = bench_context(quick=True)
    results = [measure(int(c), args.home, ctx, args.slo_p99_ms) for c in args.counts.split(",") if c]
    report.emit({"machine": ctx["machine"], "slo_p99_ms": args.slo_p99_ms, "multi_model": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
