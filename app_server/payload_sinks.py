"""Where the payload log goes: rotated gzip JSON-lines files, or a capped Redis stream; and reading the
files back (``tandem drift report``).

Files (``file:///DIR``): ``DIR/payload-<UTC start>-<pid>-<n>.jsonl.gz``, one JSON record per line (schema
in :mod:`app_server.payload_log`), a new file after ``payload_rotate_mb`` of records or
``payload_rotate_s`` seconds. Each batch ends with a gzip sync flush, so a file being written reads
complete up to its last batch (readers stop quietly at its unfinished end); several app servers can
share a directory (the pid and start time keep names apart).

Redis (``redis://HOST:PORT/DB?stream=KEY``, default key ``tandem:payload``): one stream entry per record,
its JSON under the field ``record``, added with ``XADD MAXLEN ~ payload_stream_maxlen`` so the stream
stays capped; a consumer reads it with ``XRANGE``/``XREAD`` (or a consumer group).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

import orjson

DEFAULT_STREAM = "tandem:payload"


class Sink(Protocol):
    def write(self, records: list[dict[str, Any]]) -> None:
        """Write every record or raise: the caller counts a failed batch as dropped."""

    def close(self) -> None: ...


def sink_for(url: str, settings: Any) -> Sink:
    """The sink a ``--payload-log`` URL names; ``ValueError`` for any other scheme."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileSink(Path(parsed.path), settings.payload_rotate_mb * 1e6, settings.payload_rotate_s)
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisSink(url, settings.payload_stream_maxlen)
    raise ValueError(f"--payload-log {url!r}: expected file:///DIR or redis://HOST:PORT/DB?stream=KEY")


def _dumps(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY, default=str)


class FileSink:
    def __init__(self, folder: Path, rotate_bytes: float = 64e6, rotate_s: float = 3600.0) -> None:
        self.folder = folder
        self.rotate_bytes = rotate_bytes
        self.rotate_s = rotate_s
        self._file: Any = None
        self._opened = 0.0
        self._bytes = 0
        self._seq = 0

    def write(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(_dumps(r) + b"\n" for r in records)
        try:
            if (
                self._file is None
                or self._bytes >= self.rotate_bytes
                or time.monotonic() - self._opened >= self.rotate_s
            ):
                self._open()
            self._file.write(data)
            self._file.flush(zlib.Z_SYNC_FLUSH)
            self._bytes += len(data)
        except OSError:
            self._close_quietly()  # a full disk or a vanished folder: the next batch opens a new file
            raise

    def _open(self) -> None:
        self._close_quietly()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._file = gzip.open(  # noqa: SIM115 (open across writes, closed at rotation and on close)
            self.folder / f"payload-{stamp}-{os.getpid()}-{self._seq:04d}.jsonl.gz", "wb"
        )
        self._opened = time.monotonic()
        self._bytes = 0

    def _close_quietly(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_quietly()


class RedisSink:
    def __init__(self, url: str, maxlen: int = 1_000_000) -> None:
        import redis

        parsed = urlparse(url)
        query = parse_qs(parsed.query)
        self.stream = (query.pop("stream", None) or [DEFAULT_STREAM])[0]
        bare = urlunparse(parsed._replace(query=urlencode(query, doseq=True)))
        self.maxlen = maxlen
        # Short timeouts: a Redis that is gone must fail a batch quickly, so the writer backs off and
        # the buffer (not a hung socket) absorbs the outage.
        self.client = redis.Redis.from_url(bare, socket_timeout=1.0, socket_connect_timeout=1.0)

    def write(self, records: list[dict[str, Any]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for r in records:
            pipe.xadd(self.stream, {"record": _dumps(r)}, maxlen=self.maxlen, approximate=True)
        pipe.execute()

    def close(self) -> None:
        self.client.close()


def read_records(folder: Path, since: float | None = None) -> Iterator[dict[str, Any]]:
    """Every record in the payload log files of ``folder`` (oldest file first), from ``since`` (epoch
    seconds) on. A file still being written is read up to its last complete batch; a damaged line is skipped."""
    for path in sorted(folder.glob("payload-*.jsonl.gz"), key=lambda p: p.stat().st_mtime):
        try:
            with gzip.open(path, "rb") as f:
                for line in f:
                    try:
                        record = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if since is None or record.get("time", 0) >= since:
                        yield record
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
            continue  # the unfinished end of a file being written
