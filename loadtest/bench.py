"""Benchmark: the highest request rate each serving configuration holds within a p99 SLO, no errors.

    python -m loadtest.bench [--model small|large] [--quick] [--slo-p99-ms 50] [--multi-model 1,2,10,50]
                             [--json OUT]

Configurations, each started here as real processes on the same CPUs:
``baseline`` (one FastAPI process, model inside, one request at a time), ``baseline_per_core`` (the same,
one uvicorn process per server CPU), ``tandem_batch1`` (app server + worker, max batch 1) and
``tandem_adaptive`` (app server + worker, batching up to 64 rows in a 10 ms window). Also measured:
the raw engine ceiling, and on the small model the serving overhead at low load. ``--multi-model``
adds many small models on one worker under a mixed load (``loadtest/multimodel.py``).

CPU split: the load generator (this process) is pinned to ``--client-cpus`` and every configuration to
``--server-cpus``; see docs/benchmarks.md for why the default on a 2-core machine is what it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import engine, multimodel, openloop, report, servers
from loadtest.search import find_max_rate
from shared import registry
from shared.features import load_spec
from shared.settings import home_registry_uri

CONFIGS = ("baseline", "baseline_per_core", "tandem_batch1", "tandem_adaptive", "tandem_apps")
"""``tandem_apps`` (not in the default set): ``tandem_adaptive`` with one app server per server CPU
sharing the port, as ``tandem up --apps N`` runs them."""
DEFAULT_CONFIGS = CONFIGS[:4]
MODEL_NAMES = {"small": "demo", "large": "demo-large", "xlarge": "demo-xlarge"}


def parse_cpus(text: str | None, default: set[int]) -> set[int]:
    if not text:
        return default
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def machine(client_cpus: set[int], server_cpus: set[int]) -> dict[str, Any]:
    """Measured, never typed in: what this run really had."""
    import onnxruntime as ort

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kb = next((int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal")), 0)
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "gpu": "present" if Path("/dev/nvidia0").exists() else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "numpy": np.__version__,
        "client_cpus": sorted(client_cpus),
        "server_cpus": sorted(server_cpus),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
    }


class Model:
    """A registered demo model, downloaded, with one request body and its encoded row."""

    def __init__(self, home: Path, size: str, **register: Any) -> None:
        """``register``: keywords of ``register_demo`` for a first registration (rows, epochs)."""
        from tandem.demo import register_demo

        self.uri = home_registry_uri(home)
        self.name = MODEL_NAMES[size]
        ref = registry.resolve_alias(self.uri, self.name, "production")
        if ref is None:
            print(f"registering {self.name} (first run only)...", file=sys.stderr)
            ref = register_demo(self.uri, size, **register)
        self.version = ref.version
        self.dir = registry.download(self.uri, ref, home / "cache")
        files = registry.model_files(self.dir)
        self.onnx = files["onnx"]
        instance = registry.read_input_example(self.dir)["instances"][0]
        self.body = json.dumps({"instances": [instance]}).encode()
        self.row = load_spec(files["feature_spec"].read_bytes()).encoder.encode([instance])


def start(config: str, model: Model, logs: Path, cpus: set[int], device: str = "cpu") -> servers.Server:
    """Thread counts are each setup's own default, as a user would run it: ONNX Runtime's default (0, all
    cores) for the single baseline process, one thread per process for the per-core baseline (N
    processes of N threads would oversubscribe), and the worker's own default (0) for Tandem. Every
    configuration runs its model on ``device``."""
    if config in ("baseline", "baseline_per_core"):
        per_core = config == "baseline_per_core"
        return servers.start_baseline(
            config,
            model.dir,
            logs,
            cpus,
            workers=len(cpus) if per_core else 1,
            intra_op_threads=1 if per_core else 0,
            version=model.version,
            device=device,
        )
    batch = 1 if config == "tandem_batch1" else 64
    apps = len(cpus) if config == "tandem_apps" else 1
    return servers.start_tandem(
        config,
        model.uri,
        model.name,
        logs,
        cpus,
        max_batch_size=batch,
        max_latency_ms=10.0,
        batcher="simple" if batch == 1 else "adaptive",
        intra_op_threads=0,
        device=device,
        apps=apps,
    )


def guess_start(config: str, ceiling: dict[str, Any], ncpus: int) -> float:
    """A first rate well inside capacity, from the engine figures: it saves steps, nothing more."""
    single = 1.0 / (1.0 / ceiling["by_batch_size"]["1"] + 0.0005)  # one row plus ~0.5 ms of HTTP
    if config == "baseline_per_core":
        return 0.5 * single * ncpus
    if config in ("tandem_adaptive", "tandem_apps"):
        return 0.4 * min(ceiling["rows_per_s"], 2000.0)
    return 0.5 * single


def measure_config(config: str, model: Model, args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    server = start(config, model, ctx["logs"], ctx["server_cpus"], ctx.get("device", "cpu"))
    try:
        server.wait_ready()
        openloop.run(server.predict_url, model.body, 50, 1.0)  # connections, caches, JIT-free warm path

        def measure(rate: float) -> dict[str, Any]:
            before = server.batch_totals()
            s = openloop.run(server.predict_url, model.body, rate, ctx["step_s"], warmup_s=ctx["warmup_s"])
            after = server.batch_totals()
            if before and after and after[1] > before[1]:
                s["mean_batch_size"] = round((after[0] - before[0]) / (after[1] - before[1]), 2)
            else:
                s["mean_batch_size"] = 1.0 if before is None else None
            print(f"  {config:<18} {rate:>7.0f}/s  p99 {s['p99_ms']} ms  errors {s['errors']}", file=sys.stderr)
            server.settle()
            return s

        start_rate = float(round(guess_start(config, ctx["ceiling"], len(ctx["server_cpus"]))))
        best, steps = find_max_rate(measure, start_rate, args.slo_p99_ms, max_steps=ctx["max_steps"])
    finally:
        server.stop()
    out: dict[str, Any] = {"config": config, "max_rate": best.rate if best else 0.0}
    b = best.summary if best else {}
    out.update(p50_ms=b.get("p50_ms"), p99_ms=b.get("p99_ms"), mean_batch_size=b.get("mean_batch_size"))
    out["client_cpu_pct"] = b.get("client_cpu_pct")
    if config == "tandem_adaptive":
        out["batcher"] = "adaptive"
    out["steps"] = [[s.rate, s.summary["p99_ms"], s.summary["errors"]] for s in steps]
    return out


def measure_overhead(home: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    """Small model, low load: p50 of /predict minus p50 of the bare session on the same encoded row."""
    small = Model(home, "small")
    threads = len(ctx["server_cpus"])
    device = ctx.get("device", "cpu")
    direct = engine.direct_p50_ms(small.onnx, small.row, ctx["server_cpus"], intra_op_threads=threads, device=device)
    out: dict[str, Any] = {"model": "small", "rate": 50.0, "direct_p50_ms": direct}
    for config in ("tandem_adaptive", "baseline"):
        server = start(config, small, ctx["logs"], ctx["server_cpus"], device)
        try:
            server.wait_ready()
            s = openloop.run(server.predict_url, small.body, 50.0, 4.0, warmup_s=1.0)
        finally:
            server.stop()
        out[f"{config}_p50_ms"] = s["p50_ms"]
        out[f"{config}_p99_ms"] = s["p99_ms"]
    out["overhead_p50_ms"] = round(out["tandem_adaptive_p50_ms"] - direct, 3)
    out["baseline_overhead_p50_ms"] = round(out["baseline_p50_ms"] - direct, 3)
    out["split_cost_p50_ms"] = round(out["tandem_adaptive_p50_ms"] - out["baseline_p50_ms"], 3)
    return out


def bench_context(
    quick: bool, client: str | None = None, server: str | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """CPUs (this process pinned to the client's), step lengths, the device every configuration runs its
    model on, and where logs go, for every measurement."""
    all_cpus = os.sched_getaffinity(0)
    client_cpus = parse_cpus(client, {min(all_cpus)})
    server_cpus = parse_cpus(server, set(all_cpus))
    os.sched_setaffinity(0, client_cpus)
    return {
        "machine": machine(client_cpus, server_cpus),
        "server_cpus": server_cpus,
        "logs": Path(tempfile.mkdtemp(prefix="tandem-bench-")) / "logs",
        "step_s": 2.5 if quick else 8.0,
        "warmup_s": 1.0 if quick else 2.0,
        "max_steps": 7 if quick else 12,
        "device": device,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("small", "large"), default="large")
    ap.add_argument("--quick", action="store_true", help="large model, short steps: about 4 minutes")
    ap.add_argument("--slo-p99-ms", type=float, default=50.0)
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--home", type=Path, default=Path(".tandem/bench"), help="bench registry and model cache")
    ap.add_argument("--client-cpus", help="CPUs of the load generator, e.g. 0 (default: CPU 0)")
    ap.add_argument("--server-cpus", help="CPUs every configuration gets, e.g. 1 or 0-1 (default: all)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated, of " + ",".join(CONFIGS))
    ap.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--write-doc", action="store_true", help="update --doc even after --quick")
    ap.add_argument("--multi-model", default="", help="also: N small models on one worker, e.g. 1,2,10,50")
    ap.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA where a session opens there"
    )
    args = ap.parse_args(argv)
    size = "large" if args.quick else args.model
    t0 = time.monotonic()
    ctx = bench_context(args.quick, args.client_cpus, args.server_cpus, engine.resolve_device(args.device))
    result: dict[str, Any] = {"machine": ctx["machine"], "slo_p99_ms": args.slo_p99_ms, "device": ctx["device"]}
    args.home.mkdir(parents=True, exist_ok=True)
    model = Model(args.home, size)
    server_cpus = ctx["server_cpus"]
    ceiling = engine.ceiling(
        model.onnx, model.row, server_cpus, intra_op_threads=len(server_cpus), device=ctx["device"]
    )
    ctx["ceiling"] = ceiling
    result.update(model=model.name, quick=args.quick, engine_ceiling_rows_per_s=ceiling["rows_per_s"])
    result["engine"] = ceiling
    result["overhead"] = measure_overhead(args.home, ctx)
    result["results"] = []
    for config in [c for c in args.configs.split(",") if c]:
        if config not in CONFIGS:
            ap.error(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")
        result["results"].append(measure_config(config, model, args, ctx))
    result["ratios"] = report.ratios(result["results"])
    counts = [int(c) for c in args.multi_model.split(",") if c]
    if counts:
        result["multi_model"] = [multimodel.measure(n, args.home, ctx, args.slo_p99_ms) for n in counts]
    result["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if not args.quick or args.write_doc:
        report.update_doc(args.doc, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
