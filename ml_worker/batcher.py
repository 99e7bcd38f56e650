"""Batching policy: which queued requests of one model run together, and when.

A batcher is a pure object driven by the server with explicit timestamps (no clock, no I/O, no
threads), so the same code runs in the worker and in unit tests with a fake clock. The server calls
:meth:`Batcher.offer` for every arrival, :meth:`Batcher.poll` whenever something changes (an arrival,
a batch finishing, a timer it was asked to set), and :meth:`Batcher.observe` with every batch's
execution time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True, eq=False)
class Pending:
    """One admitted inference request waiting for, or riding in, a batch."""

    msg_id: str
    version: str
    x: Any
    """The input: a float32 matrix, or a ``pyarrow.RecordBatch`` for a version described by a signature."""
    arrival: float
    deadline: float
    reply_to: Any = None
    """Opaque routing data for the server (the ZeroMQ identity)."""
    request_id: str = ""
    batch_replies: bool = False
    """The caller takes this reply in one envelope with others of the same batch (``protocol.pack_batch``)."""
    model: str = ""
    """The registered model it is for (each model has its own batcher; replies echo it)."""

    @property
    def rows(self) -> int:
        return len(self.x)  # an array's first dimension, or a table's rows


@dataclass(slots=True)
class Poll:
    batch: list[Pending] = field(default_factory=list)
    """Requests to execute now, all of one model version (empty: nothing to run yet)."""
    expired: list[Pending] = field(default_factory=list)
    """Requests whose deadline passed while queued: answer ``deadline_exceeded``, never run."""
    wait_s: float | None = None
    """Poll again after this long even if nothing happens; ``None``: only on the next event."""


class Batcher(Protocol):
    def offer(self, item: Pending, now: float) -> bool:
        """Admit ``item`` (True) or refuse it as overloaded (False)."""

    def poll(self, now: float, can_dispatch: bool) -> Poll: ...

    def observe(self, version: str, rows: int, seconds: float) -> None:
        """Feed back one batch's execution time."""

    def cancel(self, msg_id: str) -> bool:
        """Drop a queued request whose caller went away; True if it was still queued."""

    def take_all(self) -> list[Pending]:
        """Empty the queue, returning every request in it (for a shutdown to answer)."""

    def estimated_wait_s(self, now: float) -> float: ...

    def backlog_s(self) -> float:
        """Predicted seconds of execution queued (what the other models' batchers weigh it by)."""

    def utilization(self, now: float) -> float:
        """Share of the executor this model's arrivals need."""

    @property
    def depth(self) -> int:
        """Rows queued."""


class SimpleBatcher:
    """Takes whatever is queued, up to ``max_batch_size`` rows of one version, as soon as it may run."""

    def __init__(self, max_batch_size: int = 64, max_queue: int = 1024) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._queue: deque[Pending] = deque()
        self._rows = 0
        self._mean_s_per_row = 0.0

    @property
    def depth(self) -> int:
        return self._rows

    def offer(self, item: Pending, now: float) -> bool:
        if self._rows + item.rows > self.max_queue and self._queue:
            return False
        self._queue.append(item)
        self._rows += item.rows
        return True

    def poll(self, now: float, can_dispatch: bool) -> Poll:
        result = Poll()
        if any(p.deadline <= now for p in self._queue):
            keep = deque()
            for p in self._queue:
                (result.expired if p.deadline <= now else keep).append(p)
            self._queue = keep
            self._rows = sum(p.rows for p in keep)
        if can_dispatch and self._queue:
            version = self._queue[0].version
            rows = 0
            rest: deque[Pending] = deque()
            while self._queue:
                p = self._queue.popleft()
                fits = not result.batch or rows + p.rows <= self.max_batch_size
                if p.version == version and fits:
                    result.batch.append(p)
                    rows += p.rows
                else:
                    rest.append(p)
            self._queue = rest
            self._rows -= rows
        if self._queue:
            result.wait_s = max(0.0, min(p.deadline for p in self._queue) - now)
        return result

    def observe(self, version: str, rows: int, seconds: float) -> None:
        per_row = seconds / max(rows, 1)
        self._mean_s_per_row = per_row if not self._mean_s_per_row else (0.9 * self._mean_s_per_row + 0.1 * per_row)

    def cancel(self, msg_id: str) -> bool:
        for p in self._queue:
            if p.msg_id == msg_id:
                self._queue.remove(p)
                self._rows -= p.rows
                return True
        return False

    def take_all(self) -> list[Pending]:
        items = list(self._queue)
        self._queue.clear()
        self._rows = 0
        return items

    def estimated_wait_s(self, now: float) -> float:
        return self.backlog_s()

    def backlog_s(self) -> float:
        return self._rows * self._mean_s_per_row

    def utilization(self, now: float) -> float:
        return 0.0  # it keeps no arrival rate
