"""What a 100% shadow costs callers at low load: caller p50/p99 with the shadow off and on, alternating.

One worker and one app server serve the small demo model (v1 @production); the same files registered
again as v2 carry the ``shadow`` alias. Phases alternate ``tandem.shadow.percent`` 0 and 100, each an
open-loop run at ``--rate`` for ``--seconds``; the medians of each setting's p50 and p99 are compared,
so drift of a busy machine over the run weighs on both sides alike.

    python -m loadtest.shadow_cost [--rate 50] [--seconds 8] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import openloop
from loadtest.servers import http_get, start_tandem
from shared import registry
from shared.settings import home_registry_uri

BODY = json.dumps({"instances": [{"amount": 42.0, "merchant_category": "travel", "channel": "web"}]}).encode()


def _shadow_percent(base_url: str) -> float | None:
    status, body = http_get(f"{base_url}/v1/models/demo", timeout=5)
    traffic = json.loads(body).get("traffic") if status == 200 else None
    return traffic.get("shadow_percent") if traffic else None


def run(rate: float, seconds: float, repeats: int) -> dict[str, Any]:
    from tandem.demo import register_demo

    with tempfile.TemporaryDirectory(prefix="tandem-shadow-cost-") as tmp:
        home = Path(tmp)
        uri = home_registry_uri(home)
        v1 = register_demo(uri, "small", rows=3000, epochs=1)
        folder = registry.download(uri, v1, home / "v1")
        v2 = registry.register(uri, "demo", folder, alias_if_first=None)
        registry.set_alias(uri, "demo", "shadow", v2.version)
        cpus = set(range(os.cpu_count() or 1))
        server = start_tandem(
            "shadow", uri, "demo", home / "logs", cpus, max_batch_size=64, max_latency_ms=10, batcher="adaptive",
            intra_op_threads=1, worker_args=("--poll-interval", "0.5"),
        )  # fmt: skip
        phases: list[dict[str, Any]] = []
        try:
            server.wait_ready()
            openloop.run(server.predict_url, BODY, rate, 2.0)  # warm-up
            for _ in range(repeats):
                for percent in (0.0, 100.0):
                    registry.set_model_tag(uri, "demo", "tandem.shadow.percent", f"{percent:g}")
                    deadline = time.monotonic() + 20
                    while _shadow_percent(server.base_url) != percent and time.monotonic() < deadline:
                        time.sleep(0.2)
                    s = openloop.run(server.predict_url, BODY, rate, seconds)
                    phases.append({"shadow_percent": percent, "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
                                   "ok": s["ok"], "errors": s["errors"]})  # fmt: skip
            _, metrics = http_get(f"{server.base_url}/metrics", timeout=5)
        finally:
            server.stop()
    off = [p for p in phases if p["shadow_percent"] == 0]
    on = [p for p in phases if p["shadow_percent"] == 100]

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 3)

    shadow_lines = [line for line in metrics.decode().splitlines() if line.startswith("tandem_shadow_requests_total{")]
    return {
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]},
        "rate": rate,
        "seconds": seconds,
        "phases": phases,
        "p50_ms": {"off": med(off, "p50_ms"), "on": med(on, "p50_ms")},
        "p99_ms": {"off": med(off, "p99_ms"), "on": med(on, "p99_ms")},
        "p50_delta_ms": round(med(on, "p50_ms") - med(off, "p50_ms"), 3),
        "shadow_outcomes": shadow_lines,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.rate, args.seconds, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
