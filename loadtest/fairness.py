"""A flood on a heavy model beside a light one on the same worker: what the light one's callers see.

    python -m loadtest.fairness [--flood-factor 2.5] [--light-rate 100] [--seconds 10] [--json OUT]

One worker serves ``demo-large`` (the large demo network: compute-heavy) and ``churn`` (a small one).
First the light model alone at a steady Poisson rate (its reference latency); then the same light load
while the heavy model is offered ``--flood-factor`` times what the worker can run of it (requests of 64
rows through the v2 route, so the app server's JSON work stays small and the worker's executor is the
contended resource). Reported: the light model's p50/p99/max and errors in both phases, the heavy
model's answers by status, and the heavy batch time, which bounds the light model's extra wait: under
fair sharing a light request waits for at most about the one heavy batch running when it arrives.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import openloop, report, servers
from shared import registry
from shared.features import load_spec
from shared.settings import home_registry_uri


def models(home: Path) -> tuple[str, bytes, bytes]:
    """The bench registry with demo-large and churn (registered on the first run), and a body for each."""
    from tandem.demo import register_demo

    uri = home_registry_uri(home)
    for name, size, dataset in (("demo-large", "large", "fraud"), ("churn", "small", "churn")):
        if registry.resolve_alias(uri, name, "production") is None:
            print(f"registering {name} (first run only)...", file=sys.stderr)
            register_demo(uri, size, name=name, dataset=dataset)
    churn = registry.download(uri, registry.resolve_alias(uri, "churn", "production"), home / "cache")
    light = json.dumps({"instances": registry.read_input_example(churn)["instances"][:1]}).encode()
    heavy_dir = registry.download(uri, registry.resolve_alias(uri, "demo-large", "production"), home / "cache")
    width = load_spec(registry.model_files(heavy_dir)["feature_spec"].read_text()).width
    data = np.random.default_rng(0).random(64 * width).round(4).tolist()
    heavy = json.dumps({"inputs": [{"name": "input", "shape": [64, width], "datatype": "FP32", "data": data}]})
    return uri, heavy.encode(), light


def batch_seconds(server: servers.Server, model: str) -> float:
    _, text = servers.http_get(server.metrics_url or "", timeout=5)
    found: dict[str, float] = {}
    for line in text.decode().splitlines():
        for part in ("sum", "count"):
            if line.startswith(f'tandem_inference_duration_seconds_{part}{{model="{model}"}}'):
                found[part] = float(line.rpartition(" ")[2])
    return found["sum"] / found["count"]


def brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("rate", "sent", "ok", "errors", "p50_ms", "p99_ms", "max_ms")}


def run(
    home: Path, flood_factor: float, light_rate: float, seconds: float, logs: Path, cpus: set[int]
) -> dict[str, Any]:
    uri, heavy, light = models(home)
    knobs = {"max_batch_size": 64, "max_latency_ms": 10.0, "batcher": "adaptive", "intra_op_threads": 0}
    server = servers.start_tandem("fairness", uri, "demo-large,churn", logs, cpus, **knobs)
    heavy_url = f"{server.base_url}/v2/models/demo-large/infer"
    light_url = f"{server.base_url}/v1/models/churn/predict"
    try:
        server.wait_ready()
        openloop.run_many([(heavy_url, heavy, 10.0), (light_url, light, 20.0)], 2.0)  # warm both paths
        per_batch = batch_seconds(server, "demo-large")
        alone = openloop.run(light_url, light, light_rate, seconds, poisson=True)
        flood_rate = flood_factor / per_batch
        flood, beside = openloop.run_many(
            [(heavy_url, heavy, flood_rate), (light_url, light, light_rate)], seconds, poisson=True, timeout_ms=1000
        )
        per_batch_flood = batch_seconds(server, "demo-large")
    finally:
        server.stop()
    return {
        "scenario": "fairness",
        "heavy_batch_ms_before": round(per_batch * 1000, 2),
        "heavy_batch_ms_mean": round(per_batch_flood * 1000, 2),
        "heavy_capacity_req_s": round(1 / per_batch, 1),
        "heavy_offered_req_s": round(flood_rate, 1),
        "light_alone": brief(alone),
        "light_beside_flood": brief(beside),
        "heavy_flood": brief(flood),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.fairness", description=__doc__.split("\n\n")[0])
    ap.add_argument("--flood-factor", type=float, default=2.5)
    ap.add_argument("--light-rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--home", type=Path, default=Path(".tandem/bench"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from loadtest.bench import bench_context

    ctx = bench_context(quick=True)
    measured = run(args.home, args.flood_factor, args.light_rate, args.seconds, ctx["logs"], ctx["server_cpus"])
    result = {"machine": ctx["machine"], **measured}
    report.emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
