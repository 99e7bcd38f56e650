"""The payload log with its real sinks (a folder, a real redis-server): the sampling rate, complete
records, a bounded buffer in front of a stalled sink, and what closing writes."""

from __future__ import annotations

import json
import time

import pytest
import redis
from procs import wait_for

from app_server import metrics
from app_server.payload_log import PayloadLog
from app_server.payload_sinks import FileSink, RedisSink, read_records

INSTANCE = {"amount": 12.5, "merchant_category": "fuel", "is_international": False}
FIELDS = {"time", "request_id", "model", "version", "variant", "instance", "entities_resolved", "prediction",
          "latency_ms"}  # fmt: skip


def offer_requests(log: PayloadLog, n: int, prefix: str = "r") -> None:
    for i in range(n):
        log.offer(f"{prefix}{i}", "demo", "3", "production", [INSTANCE], [0.25], 0.004)


def check_records(records: list[dict]) -> None:
    assert all(r.keys() == FIELDS for r in records)
    assert all(r["instance"] == INSTANCE and r["prediction"] == 0.25 and r["latency_ms"] == 4.0 for r in records)
    assert len({r["request_id"] for r in records}) == len(records)


def dropped(reason: str) -> float:
    return metrics.PAYLOAD_LOG_DROPPED.labels(reason)._value.get()


@pytest.mark.parametrize("sink", ["file", "redis"])
def test_ten_percent_of_5000_requests_are_logged_complete(sink, tmp_path, redis_server):
    stream = f"sampled-{time.monotonic_ns()}"
    target = FileSink(tmp_path) if sink == "file" else RedisSink(f"{redis_server}?stream={stream}")
    log = PayloadLog(target, sample=0.1)
    log.start()
    offer_requests(log, 5000)
    log.close()  # writes what it holds
    if sink == "file":
        records = list(read_records(tmp_path))
    else:
        records = [json.loads(f[b"record"]) for _, f in redis.Redis.from_url(redis_server).xrange(stream)]
    assert 425 <= len(records) <= 575, len(records)  # 10 % +- 1.5 points
    check_records(records)


def test_a_stalled_sink_never_holds_a_request_and_the_overflow_is_counted(redis_factory):
    server = redis_factory()
    log = PayloadLog(RedisSink(f"{server.url}?stream=s"), sample=1.0, buffer=100)
    log.start()
    client = redis.Redis.from_url(server.url)
    client.execute_command("CLIENT", "PAUSE", "3000", "WRITE")  # the sink hangs on its next XADD
    offer_requests(log, 10, "warm")
    time.sleep(0.3)
    full_before = dropped("buffer_full")
    t0 = time.perf_counter()
    offer_requests(log, 2000)
    offering_s = time.perf_counter() - t0
    # Each of the 2,000 requests spent microseconds here, not the sink's 1 s timeout.
    assert offering_s < 0.5, offering_s
    assert dropped("buffer_full") - full_before >= 2000 - 100
    written = metrics.PAYLOAD_LOG_WRITTEN._value.get()
    client.execute_command("CLIENT", "UNPAUSE")
    wait_for(lambda: metrics.PAYLOAD_LOG_WRITTEN._value.get() >= written + 100, 10, what="the backlog written")
    offer_requests(log, 50, "after")
    log.close()
    after = [json.loads(f[b"record"]) for _, f in client.xrange("s") if b'"after' in f[b"record"]]
    assert len(after) == 50  # resumed, and closing wrote what was queued


def test_closing_writes_what_the_buffer_holds(tmp_path):
    log = PayloadLog(FileSink(tmp_path / "log"), sample=1.0, buffer=5000)
    log.start()
    offer_requests(log, 3000)
    log.close()
    records = list(read_records(tmp_path / "log"))
    assert len(records) == 3000
    check_records(records)


def test_files_rotate_and_a_file_being_written_reads_up_to_its_last_batch(tmp_path):
    sink = FileSink(tmp_path, rotate_bytes=20_000)
    record = {"time": 1.0, "request_id": "x", "instance": INSTANCE}
    for _ in range(10):
        sink.write([record] * 50)  # about 5 kB a batch
    assert len(list(tmp_path.glob("payload-*.jsonl.gz"))) >= 2
    assert len(list(read_records(tmp_path))) == 500  # the last file is still open
    assert list(read_records(tmp_path, since=2.0)) == []
    sink.close()
