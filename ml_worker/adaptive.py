"""The adaptive, deadline-aware batcher: dispatch, admission and expiry from a cost model.

A pure object like every batcher (see :mod:`ml_worker.batcher`): no clock, no threads, no I/O; every
method takes ``now``. A worker has one per model it serves; requests queue per version of that model in
arrival order, and a batch holds one version. The executor is shared with the other models' batchers
through an :class:`~ml_worker.sharing.ExecutorShare`: when it is free, and what the others have queued.

Dispatch (only while the server says a batch may start; otherwise the batch keeps growing). The
forming batch is the oldest version's queue, taken in order up to ``max_batch_size`` rows, and goes
as soon as any of these holds:

1. full: it has ``max_batch_size`` rows, or a queued request of its version could not join it;
2. deadline: ``now + upper(t(b)) + margin_s`` reaches the tightest deadline in it, so waiting any
   longer would make a member late;
3. window: ``max_latency_s`` has passed since its oldest request arrived;
4. enough: it has at least ``b*`` rows, the smallest batch that keeps the executor busy at most a
   fraction rho (``target_utilization``) of the time at the arrival rate: ``λ'·t(b)/b ≤ rho`` gives
   ``b* = ⌈λ'a / (rho - λ'c)⌉``, ``λ'`` the version's arrival rate times ``headroom``. With rho = 1
   that is the smallest batch that merely keeps up; rho < 1 keeps queueing delay bounded and, on a CPU,
   leaves cores to the I/O loops beside the model. At low load ``b* = 1``, so a lone request runs at
   once; near capacity ``b*`` reaches the full batch. What the other models keep busy is taken off rho
   first, so a model sharing a loaded executor forms larger, cheaper batches.

The arrival rate behind ``b*`` is the version's own: during a swap the old version's rate decays
within a second, so its last requests go at once instead of waiting for company that is not coming.

When none holds, :attr:`Poll.wait_s` is the time until the window closes or the deadline rule fires,
whichever is first, so the server wakes exactly then (arrivals and finished batches wake it anyway).

When a batch goes, it takes the prefix of the candidates that finishes the most of them in time
(normally all; see :meth:`AdaptiveBatcher._best_prefix` for why a slipped head is dropped rather
than run in a one-row batch).

Admission (:meth:`AdaptiveBatcher.offer`) estimates when the request would finish: the running batch's
predicted end, the queue ahead drained in full batches at mean cost, each version's rows at that
version's cost (plus three deviations of their summed noise), what the other models will run meanwhile
at their fair share, then its own batch, grown by the rows expected to arrive meanwhile, at the
pessimistic cost plus ``margin_s``. If that is past its deadline it is refused now (``overloaded``) rather than
queued to die; so is anything beyond ``max_queue`` rows. Past capacity this keeps the queue at about
one budget of work, so the load is shed at the door and the admitted requests still finish in time.
One exception, the *probe*: a request the estimate would refuse is admitted and run anyway when the
executor is idle with nothing queued, at most once per ``probe_interval_s``. Refused requests never
run, so they never correct the cost model; without probes one stalled batch, or a slow stretch that
has passed, could leave the model over-predicting and the worker refusing everything for good.

Expiry: a queued request is answered ``deadline_exceeded`` and never run once its deadline has passed
or it can no longer make it even if dispatched at the earliest moment (now, or when the running
batch is predicted to end) at the pessimistic cost: a late answer is useless to a caller that has
already given up, and running it takes the executor from requests that can still make it. The test
leaves out ``margin_s``, so the margin is slack between "must go now" and "give up".

Costs are per version (the device is fixed per worker). With more than one batch in flight the
executor is still treated as one queue: parallel batches on one device slow each other down.
See docs/architecture.md, "Adaptive batching".
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Mapping

from ml_worker.batcher import Pending, Poll
from ml_worker.cost_model import ArrivalRate, CostModel
from ml_worker.sharing import ExecutorShare

MAX_SKIPS = 8
"""Requests too large for the forming batch that a scan steps over looking for smaller ones."""


class AdaptiveBatcher:
    """Batches of one model version, dispatched by deadline, fill, window and arrival rate."""

    def __init__(
        self,
        max_batch_size: int = 64,
        max_latency_s: float = 0.010,
        max_queue: int = 1024,
        *,
        margin_s: float = 0.001,
        headroom: float = 1.2,
        target_utilization: float = 0.5,
        rate_tau_s: float = 0.5,
        cost_window: int = 128,
        max_versions: int = 4,
        probe_interval_s: float = 0.1,
        name: str = "",
        share: ExecutorShare | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self.max_queue = max_queue
        self.margin_s = margin_s
        """Slack for what the cost model does not see: the event loop's hand-off and reply sending."""
        self.headroom = headroom
        """Arrival rate is multiplied by this before sizing ``b*``, so estimation noise errs large."""
        self.target_utilization = target_utilization
        """Most of the time the executor should be busy at the arrival rate: ``b*`` is sized for it.
        Below 1 it trades a little waiting for larger, cheaper-per-row batches, which pays twice on a
        CPU: the model costs less per row, and the cores it frees serve the I/O loops beside it."""
        self.max_versions = max_versions
        self.probe_interval_s = probe_interval_s
        """Least time between two probes (see the module docstring): bounds the work spent on requests
        the estimate says are doomed, if it is right, while letting it heal quickly if it is wrong."""
        self._last_probe = -math.inf
        self._probes: set[int] = set()  # id() of queued probes: never expired on a prediction
        self.name = name
        """The model this batcher queues for, as the shared executor knows it."""
        self._share = share or ExecutorShare()
        self._cost_window = cost_window
        self._costs: dict[str, CostModel] = {}
        self._last_version: str | None = None
        self._rate_tau_s = rate_tau_s
        self._rate = ArrivalRate(rate_tau_s)
        self._vrates: dict[str, ArrivalRate] = {}
        self._queues: dict[str, deque[Pending]] = {}
        self._vrows: dict[str, int] = {}
        self._rows = 0
        self._live: set[int] = set()  # id() of queued items; heap and deques drop dead ones lazily
        self._heap: list[tuple[float, int, Pending]] = []  # (deadline, seq, item): expiry order
        self._seq = itertools.count()
        self._backlog: float | None = None
        """:meth:`backlog_s`, kept until the queue or a cost model changes: every other model's admission
        asks for it, and with many models recomputing it each time was most of the loop's work."""

    # -- cost model ----------------------------------------------------------------------------------

    def cost(self, version: str) -> CostModel:
        """The version's cost model; a new version starts from the line of the last one used."""
        model = self._costs.get(version)
        if model is None:
            prior = self._costs.get(self._last_version or "")
            line = (prior.a, prior.c) if prior else (1e-3, 0.0)
            model = CostModel(window=self._cost_window, prior=line, prior_sizes=(1, self.max_batch_size))
            self._costs[version] = model
            self._last_version = self._last_version or version
            self._forget_old_versions(keep=version)
        return model

    def seed(self, version: str, timings: Mapping[int, float]) -> None:
        """Seed ``version``'s cost model from warm-up timings; cheap and idempotent once seeded."""
        model = self._costs.get(version)
        if model is not None and model.seeded:
            return
        self._backlog = None
        self.cost(version).seed(timings)

    def observe(self, version: str, rows: int, seconds: float) -> None:
        self._backlog = None
        self.cost(version).observe(rows, seconds)
        self._last_version = version
        self._share.finished()  # a batch finished: drop the earliest predicted end

    def arrival_rate(self, now: float) -> float:
        """Rows per second offered recently (admitted or not)."""
        return self._rate.rate(now)

    def _forget_old_versions(self, keep: str) -> None:
        """Bound memory across many swaps: drop the oldest models of versions with nothing queued."""
        for v in list(self._costs):
            if len(self._costs) <= self.max_versions:
                break
            if v not in (keep, self._last_version) and not self._vrows.get(v):
                del self._costs[v]
                self._vrates.pop(v, None)

    def backlog_s(self) -> float:
        """Predicted seconds of execution queued here, each version's rows at that version's cost."""
        if self._backlog is None:
            self._backlog = sum(self._drain_s(rows, self.cost(v)) for v, rows in self._vrows.items())
        return self._backlog

    def utilization(self, now: float) -> float:
        """Share of the executor this model's arrivals need at full batches (a lower bound of its use)."""
        if not self._last_version:
            return 0.0
        b = self.max_batch_size
        return self._rate.rate(now) * self.cost(self._last_version).predict(b) / b

    # -- admission -----------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._rows

    def offer(self, item: Pending, now: float) -> bool:
        self._rate.add(item.rows, now)
        vrate = self._vrates.get(item.version)
        if vrate is None:
            vrate = self._vrates[item.version] = ArrivalRate(self._rate_tau_s)
        vrate.add(item.rows, now)
        if self._rows and self._rows + item.rows > self.max_queue:
            return False
        if self._finish_estimate(item, now) > item.deadline:
            if self._rows or self._free_at(now) > now or now - self._last_probe < self.probe_interval_s:
                return False
            self._probes.add(id(item))
            self._last_probe = now
        v = item.version
        if not self._rows:
            self._share.has_queue(self.name, True)
        if v not in self._queues:
            self._queues[v] = deque()
            self._vrows[v] = 0
        self._queues[v].append(item)
        self._vrows[v] += item.rows
        self._rows += item.rows
        self._backlog = None
        self._live.add(id(item))
        heapq.heappush(self._heap, (item.deadline, next(self._seq), item))
        if len(self._heap) > 4 * len(self._live) + 64:
            self._compact()
        return True

    def estimated_wait_s(self, now: float) -> float:
        """Seconds until a request arriving now would start executing (for routing heartbeats)."""
        own = self.backlog_s()
        return self._free_at(now) - now + own + self._share.others_backlog_s(self.name, own)

    def _finish_estimate(self, item: Pending, now: float) -> float:
        """Predicted end of ``item``'s batch if it were queued now, pessimistically.

        FIFO: the queue ahead drains in full batches at mean cost, each version's rows at its own
        cost, plus three deviations of their summed noise, and the other models run their fair share
        meanwhile; then its own batch, which by then holds the rows arriving meanwhile too (at high
        load it is full, not the partial batch the queue shows now), at the pessimistic cost.
        """
        v = item.version
        cost = self.cost(v)
        start = self._free_at(now)
        b = self.max_batch_size
        queued = self._vrows.get(v, 0)
        if item.rows >= b:  # runs alone, after everything queued
            ahead = queued
            own = item.rows
        else:
            total = queued + item.rows
            ahead = (total - 1) // b * b
            own = total - ahead
        others = sum(self._drain_s(rows, self.cost(u)) for u, rows in self._vrows.items() if u != v)
        mine = self._drain_s(ahead, cost) + others
        wait = mine + self._share.others_backlog_s(self.name, mine + cost.predict(own))
        wait += 3.0 * cost.sigma * math.sqrt(-(-ahead // b))
        if item.rows < b:
            own = min(b, own + math.ceil(self._version_rate(v, now) * wait))
        return start + wait + cost.upper(own) + self.margin_s

    def _version_rate(self, version: str, now: float) -> float:
        rate = self._vrates.get(version)
        return rate.rate(now) if rate is not None else 0.0

    def _drain_s(self, rows: int, cost: CostModel) -> float:
        full, rest = divmod(rows, self.max_batch_size)
        return full * cost.predict(self.max_batch_size) + (cost.predict(rest) if rest else 0.0)

    def _free_at(self, now: float) -> float:
        """When the shared executor is predicted to be free: now, or the earliest in-flight batch's end."""
        return self._share.free_at(now)

    # -- dispatch ------------------------------------------------------------------------------------

    def poll(self, now: float, can_dispatch: bool) -> Poll:
        result = Poll()
        start = now if can_dispatch else self._free_at(now)
        self._expire(now, start, result.expired)
        if not self._rows:
            return result
        if not can_dispatch:
            result.wait_s = max(self._next_doom() - now, 0.0)
            return result
        version = min((self._head(q) for q in self._queues.values()), key=lambda p: p.arrival).version
        cost = self.cost(version)
        cands, left_behind = self._candidates(version)
        rows = sum(p.rows for p in cands)
        latest_start = min(p.deadline for p in cands) - cost.upper(rows) - self.margin_s
        window_close = cands[0].arrival + self.max_latency_s
        go = (
            rows >= self.max_batch_size
            or left_behind
            or now >= latest_start
            or now >= window_close
            or rows >= self._target_rows(version, cost, now)
        )
        if not go:
            self._queues[version].extendleft(reversed(cands))
            result.wait_s = max(min(window_close, latest_start, self._next_doom()) - now, 0.0)
            return result
        k, cutoff = self._best_prefix(cands, cost, now)
        self._queues[version].extendleft(reversed(cands[k:]))
        for p in cands[:k]:
            self._remove(p)
            (result.batch if p.deadline >= cutoff else result.expired).append(p)
        self._share.started(now + cost.predict(sum(p.rows for p in result.batch)))
        return result

    def _candidates(self, version: str) -> tuple[list[Pending], bool]:
        """Pop up to ``max_batch_size`` rows off the front of ``version``'s queue, in order, stepping
        over requests too large to join; also says whether any request of the version stays behind."""
        q = self._queues[version]
        cands: list[Pending] = []
        skipped: list[Pending] = []
        rows = 0
        while q and rows < self.max_batch_size and len(skipped) < MAX_SKIPS:
            p = q.popleft()
            if id(p) not in self._live:
                continue
            if cands and rows + p.rows > self.max_batch_size:
                skipped.append(p)
                continue
            cands.append(p)
            rows += p.rows
        q.extendleft(reversed(skipped))
        return cands, self._vrows[version] > rows

    def _best_prefix(self, cands: list[Pending], cost: CostModel, now: float) -> tuple[int, float]:
        """How many candidates to take now, and the deadline below which a taken one is dropped.

        Picks the prefix that finishes the most requests in time (``deadline >= now + upper + margin``;
        ties go to the shorter one). Normally that is all of them. When the head of the queue has
        slipped so close to its deadline that only a tiny batch could still serve it, running that
        tiny batch would delay everyone behind it and make the next head slip too (a spiral into
        one-row batches at exactly the load where full ones matter most); so such a request is
        answered ``deadline_exceeded`` instead, once it would miss even the pessimistic estimate
        without the margin.
        """
        deadlines: list[float] = []
        best, best_k, rows, best_rows = -1, 1, 0, cands[0].rows
        for k, p in enumerate(cands, 1):
            rows += p.rows
            bisect.insort(deadlines, p.deadline)
            on_time = len(deadlines) - bisect.bisect_left(deadlines, now + cost.upper(rows) + self.margin_s)
            if on_time > best:
                best, best_k, best_rows = on_time, k, rows
        if best == 0:  # nobody makes it with the margin: run the head alone, best effort
            return 1, -math.inf
        return best_k, now + cost.upper(best_rows)

    def _head(self, q: deque[Pending]) -> Pending:
        """The first live request of a version's queue (a queue in the dict always has one)."""
        while id(q[0]) not in self._live:
            q.popleft()
        return q[0]

    def _target_rows(self, version: str, cost: CostModel, now: float) -> float:
        """``b*``: the smallest batch with which the executor is busy at most ``target_utilization`` of
        the time at the version's arrival rate: ``λ·t(b)/b ≤ rho`` gives ``b ≥ λa / (rho - λc)``. The
        other models' use comes off rho first (never below a quarter of it: their estimate is a
        lower bound, and a model must not be pushed to full batches by a neighbour's brief burst)."""
        lam = self._version_rate(version, now) * self.headroom
        rho = self.target_utilization
        rho = max(rho - self._share.others_utilization(self.name, now), 0.25 * rho)
        if lam * cost.c >= rho:
            return self.max_batch_size
        return max(1.0, math.ceil(lam * cost.a / (rho - lam * cost.c)))

    # -- expiry and cancellation ---------------------------------------------------------------------

    def _expire(self, now: float, start: float, out: list[Pending]) -> None:
        """Move to ``out`` queued requests past their deadline or unable to make it from ``start``.

        Walks the deadline heap from the earliest and stops at the first request that can still
        make it; a larger request behind it is caught on a later poll or when its batch forms.
        """
        heap = self._heap
        while heap:
            deadline, _, p = heap[0]
            if id(p) not in self._live:
                heapq.heappop(heap)
                continue
            if deadline > now and (id(p) in self._probes or start + self.cost(p.version).upper(p.rows) <= deadline):
                return
            heapq.heappop(heap)
            self._remove(p)
            out.append(p)

    def _next_doom(self) -> float:
        """When the earliest-deadline queued request stops being able to make it."""
        heap = self._heap
        while heap and id(heap[0][2]) not in self._live:
            heapq.heappop(heap)
        if not heap:
            return math.inf
        deadline, _, p = heap[0]
        return deadline if id(p) in self._probes else deadline - self.cost(p.version).upper(p.rows)

    def cancel(self, msg_id: str) -> bool:
        for q in self._queues.values():
            for p in q:
                if p.msg_id == msg_id and id(p) in self._live:
                    self._remove(p)
                    return True
        return False

    def take_all(self) -> list[Pending]:
        items = sorted((p for q in self._queues.values() for p in q if id(p) in self._live), key=lambda p: p.arrival)
        for p in items:
            self._remove(p)
        self._heap.clear()
        return items

    def _remove(self, p: Pending) -> None:
        """Forget a queued request; its deque and heap entries are dropped when next met."""
        self._live.discard(id(p))
        self._probes.discard(id(p))
        self._rows -= p.rows
        self._backlog = None
        self._vrows[p.version] -= p.rows
        if not self._vrows[p.version]:
            del self._vrows[p.version]
            del self._queues[p.version]
        if not self._rows:
            self._share.has_queue(self.name, False)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if id(e[2]) in self._live]
        heapq.heapify(self._heap)
