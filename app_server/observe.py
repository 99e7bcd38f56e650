"""What an app server does with an answered ``/predict`` request besides answering it: feed the drift
gauges (:mod:`app_server.drift`) and the payload log (:mod:`app_server.payload_log`).

:meth:`Observer.observe` runs on the event loop after the answer is built, and costs a deque append
and, for a sampled request, a few ``put_nowait``: the work (binning, PSI, JSON, I/O) is on their
threads. It never raises into a request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from app_server.drift import DriftMonitor
from app_server.payload_log import PayloadLog
from app_server.workers import WorkerPool
from shared.settings import AppSettings

logger = logging.getLogger(__name__)


class Observer:
    def __init__(self, drift: DriftMonitor | None, payload: PayloadLog | None) -> None:
        self.drift = drift
        self.payload = payload

    @classmethod
    def from_settings(cls, settings: AppSettings, pool: WorkerPool) -> Observer | None:
        drift = None
        if settings.drift:
            drift = DriftMonitor(
                pool.described,
                window=settings.drift_window,
                sample=settings.drift_sample,
                interval_s=settings.drift_interval_s,
            )
        payload = PayloadLog.from_settings(settings)
        return cls(drift, payload) if drift or payload else None

    def start(self) -> None:
        for part in (self.drift, self.payload):
            if part is not None:
                part.start()

    def close(self) -> None:
        """Stop the drift thread; write what the payload log holds, then close its sink."""
        for part in (self.drift, self.payload):
            if part is not None:
                part.close()

    def observe(self, model: str, instances: Sequence[Any], answer: Mapping[str, Any], latency_s: float) -> None:
        try:
            predictions = answer["predictions"]
            version = str(answer.get("model_version"))
            if self.drift is not None:
                self.drift.offer(model, version, instances, predictions)
            if self.payload is not None:
                self.payload.offer(
                    answer.get("request_id", ""), model, version, answer.get("variant", "production"),
                    instances, predictions, latency_s,
                )  # fmt: skip
        except Exception:  # observing must never cost the caller its answer
            logger.exception("observing a request failed")
