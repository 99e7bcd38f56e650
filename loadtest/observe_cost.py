"""What observing costs per request, in CPU time, without a server: ``Observer.observe`` as the event
loop calls it after each answer (drift on, payload log sampling 1 %), then the drift thread's fold of
those rows into the window and its PSI.

    python -m loadtest.observe_cost [--rows 10000]

CPU time per request is what a busy app server would lose to it; unlike a held rate it is barely moved
by other processes on a shared machine, so it is the figure to compare with the app server's own CPU
per request (``python -m loadtest.observe_bench --fixed-rate``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from app_server.drift import PENDING_MAX, DriftMonitor
from app_server.observe import Observer
from app_server.payload_log import PayloadLog
from app_server.payload_sinks import FileSink
from shared.reference_profile import kinds_of_spec, profile_columns
from tandem.demo_data import fraud_spec, synthesize_fraud


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.observe_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=PENDING_MAX)
    args = ap.parse_args(argv)
    n = min(args.rows, PENDING_MAX)  # one drift fold takes at most this many requests
    cols, _ = synthesize_fraud(20_000, np.random.default_rng(7))
    spec = fraud_spec(cols)
    profile = profile_columns(cols, kinds_of_spec(spec), (np.log1p(cols["amount"]) / 10).tolist())
    desc = {"feature_spec": spec.model_dump(mode="json"), "reference_profile": json.loads(profile.to_json())}
    live, _ = synthesize_fraud(n, np.random.default_rng(1))
    rows = [{k: v[i].item() for k, v in live.items()} for i in range(n)]
    answers = [{"predictions": [0.01], "model_version": "1", "request_id": f"r{i}"} for i in range(n)]
    drift = DriftMonitor(lambda m, v: desc, window=2000, interval_s=3600)
    log = PayloadLog(FileSink(Path(tempfile.mkdtemp(prefix="tandem-cost-"))), sample=0.01)
    observer = Observer(drift, log)
    t0 = time.process_time()
    for i in range(n):
        observer.observe("demo", [rows[i]], answers[i], 0.003)
    loop_us = (time.process_time() - t0) / n * 1e6
    t0 = time.process_time()
    drift.tick()
    drift_us = (time.process_time() - t0) / n * 1e6
    log.start()
    log.close()
    result = {
        "requests": n,
        "features": len(spec.features),
        "observe_us_per_request": round(loop_us, 2),
        "drift_thread_us_per_request": round(drift_us, 2),
        "total_us_per_request": round(loop_us + drift_us, 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
