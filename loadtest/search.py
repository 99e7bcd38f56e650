"""Find the highest request rate a server holds within the SLO, in few short steps.

Geometric growth from a guessed start until a step fails, then geometric bisection between the best
passing and the lowest failing rate until they are within ``resolution`` of each other. A step passes
only with zero errors of any kind and p99 at or under the SLO; one failed request fails the step, as
it would fail the user. The search is pure (the measurement is injected) so it is unit-testable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def passes(summary: dict[str, Any], slo_p99_ms: float) -> bool:
    p99 = summary.get("p99_ms")
    return not summary.get("errors") and summary.get("ok", 0) > 0 and p99 is not None and p99 <= slo_p99_ms


@dataclass(slots=True)
class Step:
    rate: float
    summary: dict[str, Any]
    passed: bool


def find_max_rate(
    measure: Callable[[float], dict[str, Any]],
    start: float,
    slo_p99_ms: float,
    *,
    max_steps: int,
    grow: float = 2.0,
    resolution: float = 0.08,
    min_rate: float = 1.0,
    retries: int = 0,
) -> tuple[Step | None, list[Step]]:
    """``(best passing step or None, every step in order)``; at most ``max_steps`` measurements.

    ``retries``: a failed step is measured again up to this many times, and passes if a repeat does (a
    clean run shows the rate can be held; a repeat only keeps one stall of the machine from capping
    the search below what it holds). Repeats count against ``max_steps``.
    """
    steps: list[Step] = []
    lo: float | None = None
    hi: float | None = None
    rate = max(start, min_rate)
    budget = max_steps
    while budget > 0:
        for _ in range(retries + 1):
            budget -= 1
            summary = measure(rate)
            ok = passes(summary, slo_p99_ms)
            steps.append(Step(rate, summary, ok))
            if ok or budget <= 0:
                break
        if ok:
            lo = rate
        else:
            hi = rate
        if hi is None:
            rate = rate * grow
        elif lo is None:
            rate = rate / grow
            if rate < min_rate:
                break
        elif hi / lo - 1.0 <= resolution:
            break
        else:
            rate = math.sqrt(lo * hi)
        rate = float(round(rate))
        if any(s.rate == rate for s in steps):
            break  # rounding brought us back to a measured rate: as precise as it gets
    passing = [s for s in steps if s.passed]
    return (max(passing, key=lambda s: s.rate) if passing else None), steps
