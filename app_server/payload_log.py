"""The payload log: a sample of requests, one record per instance, written off the request path.

A sampled request puts its records into a bounded queue (``put_nowait``: never a wait); one writer
thread takes them in batches and hands them to the sink. When the queue is full (the sink is slower
than the sampled traffic, or gone and the writer backing off) a record is dropped and counted
(``tandem_payload_log_dropped_total{reason="buffer_full"}``); a batch the sink refuses is dropped and
counted (``reason="sink_error"``). Either way the request was answered already: a slow or dead sink
costs log records, never requests. The writer retries the sink with a growing pause, so the log resumes
by itself when the sink returns; closing the log writes what the queue still holds.

One record (JSON)::

    {"time": 1764707700.123,         # seconds since the epoch (UTC) when the answer was ready
     "request_id": "…", "model": "demo", "version": "3", "variant": "production",
     "instance": {...},              # the instance as the client sent it
     "entities_resolved": false,     # features the feature store filled in are not in "instance"
     "prediction": 0.031, "latency_ms": 4.2}

Sinks (``--payload-log``, :mod:`app_server.payload_sinks`): ``file:///DIR`` (rotated gzip JSON lines) or
``redis://HOST:PORT/DB?stream=KEY`` (a stream capped with ``XADD MAXLEN ~``).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

from app_server import metrics
from app_server.payload_sinks import Sink, sink_for

logger = logging.getLogger(__name__)

BATCH = 500
BACKOFF_S = (0.25, 5.0)
"""The writer's pause after a failed write, doubling from the first figure up to the second."""


class PayloadLog:
    def __init__(self, sink: Sink, sample: float, buffer: int = 10_000) -> None:
        self.sink = sink
        self.sample = sample
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=buffer)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropped_full = metrics.PAYLOAD_LOG_DROPPED.labels("buffer_full")
        self._dropped_error = metrics.PAYLOAD_LOG_DROPPED.labels("sink_error")

    @classmethod
    def from_settings(cls, settings: Any) -> PayloadLog | None:
        if not settings.payload_log or settings.payload_sample <= 0:
            return None
        sink = sink_for(settings.payload_log, settings)
        return cls(sink, settings.payload_sample, settings.payload_buffer)

    def offer(
        self,
        request_id: str,
        model: str,
        version: str,
        variant: str,
        instances: Sequence[Any],
        predictions: Sequence[Any],
        latency_s: float,
    ) -> None:
        """Called on the event loop once per answered request: sampled per request, queued without waiting."""
        if random.random() >= self.sample:
            return
        now = time.time()
        latency_ms = round(latency_s * 1000, 3)
        put = self._queue.put_nowait
        for instance, prediction in zip(instances, predictions, strict=False):
            try:
                put({"time": now, "request_id": request_id, "model": model, "version": version,
                     "variant": variant, "instance": instance, "entities_resolved": False,
                     "prediction": prediction, "latency_ms": latency_ms})  # fmt: skip
            except queue.Full:
                self._dropped_full.inc()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tandem-payload-log", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the writer after it wrote what the queue holds (within ``timeout_s``), then close the sink."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self.sink.close()

    def _run(self) -> None:
        pause = BACKOFF_S[0]
        down = False
        while True:
            batch = self._take()
            if not batch:
                if self._stop.is_set():
                    return
                continue
            try:
                self.sink.write(batch)
            except Exception as exc:
                self._dropped_error.inc(len(batch))
                if not down:
                    logger.warning("payload log: the sink failed (%s); dropping records until it is back", exc)
                down = True
                if self._stop.wait(pause):  # closing: one more try of what is left, then give up
                    self._drain_once()
                    return
                pause = min(pause * 2, BACKOFF_S[1])
                continue
            metrics.PAYLOAD_LOG_WRITTEN.inc(len(batch))
            if down:
                logger.info("payload log: the sink is back, writing again")
                down, pause = False, BACKOFF_S[0]

    def _take(self) -> list[dict[str, Any]]:
        """Up to :data:`BATCH` records: waits for the first at most 0.2 s, then takes what is there."""
        try:
            batch = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _drain_once(self) -> None:
        while batch := self._take():
            try:
                self.sink.write(batch)
                metrics.PAYLOAD_LOG_WRITTEN.inc(len(batch))
            except Exception:
                self._dropped_error.inc(len(batch) + self._queue.qsize())
                return
