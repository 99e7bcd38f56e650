"""How the models of one worker share its executor: who runs next, and what each batcher may assume.

Two pure, clock-free objects (every method takes ``now`` or a measured duration), used by the server
and by every model's batcher:

- :class:`FairShare` picks which model's batch takes a free executor slot: start-time fair queueing on
  execution time. Each model carries a virtual time, its executed seconds divided by its weight; the
  model with a batch ready and the lowest virtual time goes first. A model that was idle re-enters at
  the current virtual time, so idling banks no credit to burst with later. Under contention every
  model gets execution time in proportion to its weight (equal by default), whatever its request
  rate or its cost per batch; without contention a model runs as soon as its batcher says so, exactly
  as if it were alone. A flood on one model therefore delays a light one by at most about one batch
  of the flooded model (the one running when its request arrives). Why virtual time rather than
  deficit round robin with a quantum: the cost of a batch is known only after it ran, and charging
  the measured seconds needs no quantum to tune; the two give the same shares.
- :class:`ExecutorShare` is the executor as each batcher sees it: when it is predicted to be free (the
  ends of the batches in flight, whichever model they belong to), how much work the other models
  have queued, and how busy they keep it. A batcher uses these in admission (the wait of a request
  includes what the other models will run meanwhile, at their fair share) and in sizing its batches.

See docs/architecture.md, "Sharing the executor".
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Protocol


class Member(Protocol):
    """What :class:`ExecutorShare` reads of a model's batcher."""

    def backlog_s(self) -> float:
        """Predicted seconds of execution its queue holds."""

    def utilization(self, now: float) -> float:
        """Fraction of the executor its arrivals keep busy at its most efficient batch size."""


class ExecutorShare:
    """The shared executor's predicted occupancy and the other models' claims on it."""

    UTILIZATION_TTL_S = 0.005
    """How long a sum of the members' utilisations is reused: it moves with arrival rates (time constant
    0.5 s), and summing it over fifty models for every poll would cost more than it informs."""

    def __init__(self) -> None:
        self._ends: list[float] = []  # predicted end of each batch in flight, any model
        self._members: dict[str, tuple[float, Member]] = {}
        self._queued: dict[str, tuple[float, Member]] = {}
        """Members with rows queued: only they can hold the executor up, so only they are asked."""
        self._utilization: dict[str, float] = {}
        self._utilization_at = -1.0

    def join(self, name: str, weight: float, member: Member) -> None:
        self._members[name] = (weight, member)

    def leave(self, name: str) -> None:
        self._members.pop(name, None)
        self._queued.pop(name, None)
        self._utilization.pop(name, None)

    def has_queue(self, name: str, queued: bool) -> None:
        """A member's queue became non-empty (or empty): called on those transitions only."""
        if queued and name in self._members:
            self._queued[name] = self._members[name]
        else:
            self._queued.pop(name, None)

    def started(self, predicted_end: float) -> None:
        heapq.heappush(self._ends, predicted_end)

    def finished(self) -> None:
        """A batch ended: forget the earliest predicted end."""
        if self._ends:
            heapq.heappop(self._ends)

    def free_at(self, now: float) -> float:
        """When the executor is predicted to be free: now, or the earliest in-flight batch's end."""
        while self._ends and self._ends[0] <= now:  # overdue, or finished without a report
            heapq.heappop(self._ends)
        return self._ends[0] if self._ends else now

    @property
    def in_flight(self) -> int:
        return len(self._ends)

    def others_backlog_s(self, name: str, own_s: float) -> float:
        """Execution the other models will get while ``name`` runs ``own_s`` seconds of its own work.

        Under fair sharing, while one model executes ``own_s`` seconds each other model ``j`` with work
        queued executes up to ``own_s * w_j / w_name`` seconds, bounded by what it has queued.
        """
        if not self._queued or (len(self._queued) == 1 and name in self._queued):
            return 0.0
        weight = self._members[name][0] if name in self._members else 1.0
        total = 0.0
        for other, (w, member) in self._queued.items():
            if other != name:
                total += min(member.backlog_s(), own_s * w / weight)
        return total

    def others_utilization(self, name: str, now: float) -> float:
        if len(self._members) < 2:
            return 0.0
        if now - self._utilization_at > self.UTILIZATION_TTL_S or now < self._utilization_at:
            self._utilization = {n: m.utilization(now) for n, (_, m) in self._members.items()}
            self._utilization_at = now
        return sum(self._utilization.values()) - self._utilization.get(name, 0.0)

    def backlog_s(self) -> float:
        return sum(m.backlog_s() for _, m in self._queued.values())


class FairShare:
    """Start-time fair queueing of batches between models, weighted, on measured execution time."""

    def __init__(self) -> None:
        self._vtime: dict[str, float] = {}
        self._now = 0.0  # virtual time: the start tag of the batch dispatched last
        self._idle: set[str] = set()

    def order(self, names: Iterable[str]) -> list[str]:
        """``names`` (models with work queued), the one owed the most execution first."""
        ready = list(names)
        for name in ready:
            if name in self._idle or name not in self._vtime:
                # Re-entering after an idle spell: no credit for the time it asked for nothing.
                self._vtime[name] = max(self._vtime.get(name, 0.0), self._now)
                self._idle.discard(name)
        return sorted(ready, key=self._vtime.__getitem__)

    def dispatched(self, name: str, predicted_s: float, weight: float) -> None:
        """``name``'s batch took the executor; charge what it is predicted to cost."""
        start = self._vtime.get(name, self._now)
        self._now = max(self._now, start)
        self._vtime[name] = start + predicted_s / weight

    def correct(self, name: str, predicted_s: float, measured_s: float, weight: float) -> None:
        """The batch has run: replace the predicted charge with the measured one."""
        if name in self._vtime:
            self._vtime[name] += (measured_s - predicted_s) / weight

    def went_idle(self, name: str) -> None:
        """``name`` has nothing queued or running; its next batch re-enters at the current virtual time."""
        self._idle.add(name)

    def forget(self, name: str) -> None:
        self._vtime.pop(name, None)
        self._idle.discard(name)

    def vtime(self, name: str) -> float:
        return self._vtime.get(name, self._now)
