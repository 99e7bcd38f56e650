"""Hedged requests: a call still unanswered after the usual round trip goes to a second worker too.

One slow worker (a stall, a long batch, a noisy neighbour) sets the tail of every request routed to it.
After the rolling p95 of a model's worker round trips (and at least four times their median; or
``--hedge-after-ms``), a call with no answer yet is sent again, to another worker holding the same
version; the first good answer wins and the other copy is cancelled on the wire (the worker drops it
if it is still queued; a batch already running finishes and its answer is dropped here). The caller
gets exactly one answer either way.

Hedges are paid from a budget, as Finagle's backup requests are: every request deposits
``--hedge-budget`` of a token (default 0.05), a hedge costs a whole one, and the balance is capped, so
hedges never exceed that share of requests, also under a burst. A hedge is sent only when the time left
before the request's deadline covers another round trip at the same delay; else the worker already
holding it is the best chance.

``tandem_hedges_total{model,outcome}``: ``sent``; ``won`` (the hedge answered first) or ``lost`` (the
first worker did); ``budget`` and ``deadline`` count hedges not sent for lack of either.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app_server import metrics
from shared.protocol import Message, Status

logger = logging.getLogger(__name__)

MIN_SAMPLES = 20
"""Round trips of a model seen before its p95 is trusted to time hedges."""
WINDOW = 512
"""Round trips the rolling p95 is taken over."""
REFRESH_EVERY = 32
"""The p95 is recomputed every this many new samples, not on every request."""
MEDIAN_FACTOR = 4.0
"""A call is hedged only once it also took four times the median: where healthy round trips vary little, the
slowest 5% are barely slower than the rest, and hedging them would spend the budget for nothing."""
MAX_BALANCE = 10.0
"""Most hedges banked from quiet times: a burst after a lull spends these, then only what it deposits."""


@dataclass
class HedgeBudget:
    """Finagle-style: each request deposits ``ratio`` of a token, each hedge withdraws one."""

    ratio: float
    balance: float = 0.0
    max_balance: float = MAX_BALANCE

    def deposit(self) -> None:
        self.balance = min(self.max_balance, self.balance + self.ratio)

    def try_withdraw(self) -> bool:
        if self.balance >= 1.0:
            self.balance -= 1.0
            return True
        return False


@dataclass
class RoundTrips:
    """A model's recent worker round trips, and their p95 (recomputed now and then)."""

    samples: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    p95_s: float | None = None
    """The p95, or ``MEDIAN_FACTOR`` times the median when that is longer."""
    _since: int = 0

    def add(self, rtt_s: float) -> None:
        self.samples.append(rtt_s)
        self._since += 1
        if len(self.samples) >= MIN_SAMPLES and (self.p95_s is None or self._since >= REFRESH_EVERY):
            p50, p95 = np.percentile(np.fromiter(self.samples, float), (50, 95))
            self.p95_s = float(max(p95, MEDIAN_FACTOR * p50))
            self._since = 0


Call = Callable[[Any], Awaitable[Message]]
"""Sends the request to the worker it is given and awaits its reply."""


class Hedger:
    def __init__(self, budget_ratio: float, after_s: float | None = None) -> None:
        self.ratio = budget_ratio
        self.after_s = after_s
        """A fixed delay; ``None``: each model's rolling p95."""
        self.budgets: dict[str, HedgeBudget] = {}
        self.rtts: dict[str, RoundTrips] = {}

    @property
    def enabled(self) -> bool:
        return self.ratio > 0

    def delay_s(self, model: str) -> float | None:
        """How long a call waits before it may be hedged; ``None``: not yet known."""
        if self.after_s is not None:
            return self.after_s
        rtts = self.rtts.get(model)
        return None if rtts is None else rtts.p95_s

    def observe(self, model: str, rtt_s: float) -> None:
        rtts = self.rtts.get(model)
        if rtts is None:
            rtts = self.rtts[model] = RoundTrips()
        rtts.add(rtt_s)

    def _budget(self, model: str) -> HedgeBudget:
        budget = self.budgets.get(model)
        if budget is None:
            budget = self.budgets[model] = HedgeBudget(self.ratio)
        return budget

    async def call(
        self,
        model: str,
        first: Any,
        call: Call,
        second: Callable[[], Any | None],
        remaining_s: Callable[[], float],
    ) -> Message:
        """``call(first)``, hedged with ``call(second())`` if it is slow, and the budget and the
        deadline (``remaining_s()``) allow. ``second()`` names another worker holding the same version,
        or ``None``. Returns one reply: the first ``ok`` one, else the first worker's."""
        if not self.enabled:
            return await call(first)
        budget = self._budget(model)
        budget.deposit()
        delay = self.delay_s(model)
        if delay is None:
            return await call(first)
        primary = asyncio.ensure_future(call(first))
        try:
            done, _ = await asyncio.wait((primary,), timeout=delay)
        except asyncio.CancelledError:  # the caller left: asyncio.wait leaves its futures running
            primary.cancel()
            raise
        if done:
            return primary.result()
        other = second()
        if other is None:
            return await primary
        if remaining_s() < delay:  # a second try could not answer before the deadline
            metrics.child(metrics.HEDGES, model, "deadline").inc()
            return await primary
        if not budget.try_withdraw():
            metrics.child(metrics.HEDGES, model, "budget").inc()
            return await primary
        metrics.child(metrics.HEDGES, model, "sent").inc()
        hedge = asyncio.ensure_future(call(other))
        return await self._race(model, primary, hedge)

    async def _race(self, model: str, primary: asyncio.Future[Message], hedge: asyncio.Future[Message]) -> Message:
        """The first ``ok`` reply of the two; the other is cancelled (a cancel goes to its worker)."""
        pending = {primary, hedge}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in (primary, hedge):  # the primary first: on a tie its answer is as good
                    if fut in done and _ok(fut):
                        metrics.child(metrics.HEDGES, model, "won" if fut is hedge else "lost").inc()
                        return fut.result()
            # Neither answered ok: the first worker's outcome stands, as if there had been no hedge.
            metrics.child(metrics.HEDGES, model, "lost").inc()
            return primary.result()
        finally:
            for fut in pending:
                fut.cancel()
            if pending:
                await asyncio.wait(pending)  # each call's own cleanup (the cancel message) has run


def _ok(fut: asyncio.Future[Message]) -> bool:
    return not fut.cancelled() and fut.exception() is None and fut.result().header.get("status") == Status.OK
