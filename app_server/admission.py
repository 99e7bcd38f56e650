"""Admission at the front of the app server: refuse at once what it cannot serve in time.

Past its capacity an app server that admits everything queues the excess in its event loop and its
connections' backlog, where nothing can refuse it any more: callers time out instead of hearing 503.
Two cheap checks run before a prediction's body is read (from the prediction fast path,
:mod:`app_server.fast_path`), and a refused request is answered 503 ``overloaded`` with ``Retry-After``
through the one error renderer:

- **An adaptive concurrency limit** (:class:`AimdLimit`): predictions in progress at once. It follows the
  app server's *own* time per request, measured from admission to the answer less the time spent waiting
  for workers (the workers shed their own overload, and a slow worker is no reason for this server to
  refuse work): each window whose average is over ``--admission-target-ms`` cuts the limit by a quarter,
  each window within it where the limit was at least half used raises it by about its square root
  (additive increase, multiplicative decrease). docs/architecture.md says why AIMD on this measure and
  not a gradient.
- **An event-loop lag guard** (:class:`LoopLag`): a task wakes every ``PROBE_S`` and measures how late it
  woke. While the loop stays behind by more than ``--admission-max-lag-ms`` (two readings in a row, an
  overdue probe counting as one), new predictions are refused: a loop that late is already failing the
  requests it holds. One long stall alone refuses nothing.

Health, readiness and ``/metrics`` never pass through here. ``--no-admission`` turns both checks off
(the app server's fixed ``--max-in-flight`` cap, :meth:`~app_server.failover.Dispatcher.admitted`,
stays either way).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from dataclasses import dataclass

from app_server import metrics
from shared.errors import Overloaded
from shared.settings import AppSettings

PROBE_S = 0.025
"""How often the loop-lag probe wakes."""


@dataclass
class AimdLimit:
    """The concurrency limit, driven by windows of request samples (pure: the caller passes the clock)."""

    limit: float
    min_limit: float
    max_limit: float
    target_s: float
    """A window whose average app-server time per request exceeds this cuts the limit."""
    window_s: float = 0.1
    min_samples: int = 4
    backoff: float = 0.75
    _start: float | None = None
    _sum: float = 0.0
    _n: int = 0
    _peak: int = 0
    """The most requests in progress seen in this window."""

    def sample(self, now: float, app_s: float, in_flight: int) -> None:
        """One finished request: ``app_s`` seconds of this server's own time, ``in_flight`` as it ended
        (itself included)."""
        if self._start is None:
            self._start = now
        self._sum += app_s
        self._n += 1
        self._peak = max(self._peak, in_flight)
        if now - self._start >= self.window_s and self._n >= self.min_samples:
            self._update(self._sum / self._n)
            self._start, self._sum, self._n, self._peak = now, 0.0, 0, 0

    def _update(self, average_s: float) -> None:
        if average_s > self.target_s:
            self.limit = max(self.min_limit, self.limit * self.backoff)
        elif self._peak >= self.limit / 2:  # an unused limit is not raised: it would mean nothing
            self.limit = min(self.max_limit, self.limit + math.sqrt(self.limit))


@dataclass
class LoopLag:
    """How late this event loop runs a timer, measured by a task that sleeps ``interval_s`` at a time."""

    interval_s: float = PROBE_S
    last_s: float = 0.0
    prev_s: float = 0.0
    """The reading before ``last_s``."""
    due: float | None = None
    """When the probe should next wake; ``None`` until it runs."""

    def lag_s(self, now: float) -> float:
        """The last lag measured, or more if the probe is overdue right now."""
        overdue = 0.0 if self.due is None else now - self.due
        return max(self.last_s, overdue)

    def sustained_s(self, now: float) -> float:
        """The smaller of the two latest readings (an overdue probe being the latest): one long stall (a
        schema built for a new version, a GC pass) is over when it is noticed and refuses nothing; a
        loop that stays behind shows in both."""
        overdue = 0.0 if self.due is None else now - self.due
        if overdue > 0:
            return min(self.last_s, overdue)
        return min(self.prev_s, self.last_s)

    def woke(self, now: float) -> None:
        if self.due is not None:
            self.prev_s, self.last_s = self.last_s, max(0.0, now - self.due)
        self.due = now + self.interval_s

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            self.woke(time.monotonic())
            await asyncio.sleep(self.interval_s)


@dataclass(slots=True)
class Ticket:
    """One admitted request: when it was admitted, and how long it has waited for workers since."""

    start: float
    waited: float = 0.0


_current: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("tandem_admission", default=None)


def note_worker_wait(seconds: float) -> None:
    """Called by the dispatcher after awaiting a worker: that time is not this server's own."""
    ticket = _current.get()
    if ticket is not None:
        ticket.waited += seconds


@dataclass
class Admission:
    limiter: AimdLimit
    lag: LoopLag
    max_lag_s: float
    in_flight: int = 0

    @classmethod
    def from_settings(cls, settings: AppSettings) -> Admission | None:
        if not settings.admission:
            return None
        cap = float(settings.max_in_flight)
        initial = min(cap, float(settings.admission_initial_limit))
        limiter = AimdLimit(
            limit=initial,
            min_limit=min(initial, float(settings.admission_min_limit)),
            max_limit=cap,
            target_s=settings.admission_target_ms / 1000,
        )
        admission = cls(limiter, LoopLag(), settings.admission_max_lag_ms / 1000)
        metrics.ADMISSION_LIMIT.set_function(lambda: admission.limiter.limit)
        metrics.ADMISSION_IN_FLIGHT.set_function(lambda: admission.in_flight)
        metrics.LOOP_LAG.set_function(lambda: admission.lag.lag_s(time.monotonic()))
        return admission

    def enter(self) -> Ticket:
        """Admit one prediction, or raise :class:`~shared.errors.Overloaded` (counted by reason)."""
        now = time.monotonic()
        if self.in_flight >= self.limiter.limit:
            self._refuse("limit")
            raise Overloaded(f"app server at its concurrency limit ({int(self.limiter.limit)} requests)")
        lag = self.lag.sustained_s(now)
        if lag > self.max_lag_s:
            self._refuse("loop_lag")
            raise Overloaded(f"app server event loop {lag * 1000:.0f} ms behind")
        self.in_flight += 1
        ticket = Ticket(now)
        _current.set(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        now = time.monotonic()
        self.limiter.sample(now, max(0.0, now - ticket.start - ticket.waited), self.in_flight)
        self.in_flight -= 1

    def _refuse(self, reason: str) -> None:
        metrics.child(metrics.ADMISSION_REJECTIONS, reason).inc()
