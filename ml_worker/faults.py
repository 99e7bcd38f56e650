"""Faults injected on purpose, for drills and tests: a worker that is slow, always or now and then.

``--debug-delay-ms D`` sleeps ``D`` before every batch (a uniformly slow worker). ``--fault-stall-ms D
--fault-stall-percent P`` sleeps ``D`` before a random ``P`` % of batches: the occasional stall (a GC
pause, a noisy neighbour, a throttled GPU) that makes a tail, which hedged requests at the app server
exist to cut. Both sleep on the executor thread that runs the batch, never on the event loop, so the
worker keeps admitting, refusing and answering heartbeats while a batch stalls, as it would when a real
batch is slow.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from ml_worker import metrics
from shared.settings import WorkerSettings

Run = Callable[[Any], Any]


def with_faults(run: Run, settings: WorkerSettings, rng: random.Random | None = None) -> Run:
    """``run`` itself when no fault is configured (the normal case costs nothing), else ``run`` behind
    the configured sleeps."""
    delay_s = settings.debug_delay_ms / 1000
    stall_s = settings.fault_stall_ms / 1000
    p = settings.fault_stall_percent / 100
    if not delay_s and not (stall_s and p):
        return run
    draw = (rng or random.Random()).random

    def faulty_run(x: Any) -> Any:
        pause = delay_s
        if stall_s and draw() < p:
            pause += stall_s
            metrics.FAULT_STALLS.inc()
        if pause:
            time.sleep(pause)
        return run(x)

    return faulty_run
