"""What the adaptive batcher predicts with: execution time per batch size, and the arrival rate.

Both are pure and clock-free: every update carries its own timestamp or measurement, so the batcher
and its tests drive them with a fake clock.

The cost model fits ``t(b) = a + c·b`` (``a``: the fixed cost of a call, ``c``: the cost of one more
row) by weighted least squares over a window of recent batches. Why this shape and this fit:

- A linear model is what the dispatch and admission rules need (the time of a batch that does not
  exist yet, at any size), it is right for dense networks on CPU and GPU alike over the sizes a
  worker forms, and two parameters converge from a few dozen batches.
- Warm-up timings (and, for a brand-new version, the line of the version before it) enter the fit as
  low-weight pseudo-observations whose weight shrinks as live batches accumulate. They carry the
  slope while live traffic is all one batch size (at low load every batch has one row, which says
  nothing about ``c``) and fade once real batches of several sizes arrive.
- Noise and outliers (a GC pause, a page fault, a neighbour stealing the core) are handled by
  trimming observations more than ``TRIM`` robust deviations from the first fit and refitting, so
  one slow batch does not make the batcher shed load for the next hundred.
- ``a`` and ``c`` are constrained to be non-negative and a prediction is never below
  ``min_seconds``: a cost of zero or less would make every deadline look safe.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

import numpy as np

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a normal standard deviation."""
TRIM = 4.0
"""Observations farther than this many robust deviations from the fit are treated as outliers."""
REFIT_BATCHES = (4, 16)
"""A refit once this many batches (fewest, most) have run since the last, the fewest once they held
``REFIT_ROWS`` rows. A refit (two least-squares fits and four medians over the window) took a fifth of
a worker's CPU at low load when it ran every 4th batch, where every batch is one request and the line
hardly moves; under load, where large batches decide what is shed, it still refits every 4th batch."""
REFIT_ROWS = 64


class CostModel:
    """Online ``t(b) = a + c·b`` for one model version on this worker's device."""

    def __init__(
        self,
        *,
        window: int = 128,
        seed_weight: float = 0.5,
        min_seconds: float = 1e-5,
        prior: tuple[float, float] = (1e-3, 0.0),
        prior_sizes: tuple[int, ...] = (1, 64),
    ) -> None:
        self.window = window
        self.seed_weight = seed_weight
        self.min_seconds = min_seconds
        self._obs: deque[tuple[int, float]] = deque(maxlen=window)
        a, c = prior
        self._seed: list[tuple[int, float]] = [(b, a + c * b) for b in prior_sizes]
        self.seeded = False
        """True once real warm-up timings replaced the prior."""
        self.a, self.c = max(a, 0.0), max(c, 0.0)
        self.sigma = 0.0
        """Robust standard deviation of recent observations around the line (seconds)."""
        self._since_fit = 0
        self._rows_since_fit = 0

    def seed(self, timings: Mapping[int, float]) -> None:
        """Use warm-up timings (seconds per batch size) as the prior the live fit starts from."""
        points = [(int(b), float(t)) for b, t in timings.items() if b > 0 and t > 0 and math.isfinite(t)]
        if not points:
            return
        self._seed = points
        self.seeded = True
        self._fit()

    def observe(self, rows: int, seconds: float) -> None:
        """Record one executed batch. Refits at once while data is scarce, then every ``REFIT_BATCHES``."""
        if rows <= 0 or not seconds > 0 or not math.isfinite(seconds):
            return
        self._obs.append((rows, seconds))
        self._since_fit += 1
        self._rows_since_fit += rows
        fewest, most = REFIT_BATCHES
        due = self._since_fit >= most or (self._since_fit >= fewest and self._rows_since_fit >= REFIT_ROWS)
        if len(self._obs) < 16 or due:
            self._fit()

    @property
    def n_observed(self) -> int:
        return len(self._obs)

    def predict(self, rows: int) -> float:
        """Expected seconds to execute a batch of ``rows`` rows (always > 0)."""
        return max(self.a + self.c * rows, self.min_seconds)

    def upper(self, rows: int) -> float:
        """A pessimistic execution time: the mean plus three deviations, at least 5 % above the mean.

        The relative floor covers what the window cannot show yet (no observations, only warm-up).
        """
        t = self.predict(rows)
        return t + max(3.0 * self.sigma, 0.05 * t)

    def _fit(self) -> None:
        self._since_fit = self._rows_since_fit = 0
        n = len(self._obs)
        pts = list(self._obs) + self._seed
        b = np.array([p[0] for p in pts], dtype=np.float64)
        t = np.array([p[1] for p in pts], dtype=np.float64)
        w = np.ones(len(pts))
        # The prior fades as live batches accumulate; an invented one (no warm-up) counts for little.
        w[n:] = (self.seed_weight if self.seeded else 0.1 * self.seed_weight) * 16 / (16 + n)
        keep = np.ones(len(pts), dtype=bool)
        a, c = _wls(b, t, w, self.c)
        if n >= 8:  # enough live points to tell an outlier from the rest
            r = t[:n] - (a + c * b[:n])
            med = float(np.median(r))
            scale = max(MAD_TO_SIGMA * float(np.median(np.abs(r - med))), 0.01 * float(np.median(t[:n])), 1e-7)
            keep[:n] = np.abs(r - med) <= TRIM * scale
            a, c = _wls(b[keep], t[keep], w[keep], c)
        self.a, self.c = a, c
        if n >= 2:
            r = t[:n][keep[:n]] - (a + c * b[:n][keep[:n]])
            self.sigma = MAD_TO_SIGMA * float(np.median(np.abs(r - np.median(r)))) if r.size else 0.0


def _wls(b: np.ndarray, t: np.ndarray, w: np.ndarray, c_fallback: float) -> tuple[float, float]:
    """Weighted least squares of ``t = a + c·b`` with ``a, c >= 0``.

    With a single batch size the slope is not identifiable and ``c_fallback`` is kept. The
    constrained optimum lies on a boundary when the free one does not: ``c = 0`` (the mean) or
    ``a = 0`` (a line through the origin).
    """
    sw = float(w.sum())
    mb = float((w * b).sum()) / sw
    mt = float((w * t).sum()) / sw
    sbb = float((w * (b - mb) ** 2).sum())
    c = float((w * (b - mb) * (t - mt)).sum()) / sbb if sbb > 1e-9 * sw else c_fallback
    c = max(c, 0.0)
    a = mt - c * mb
    if a < 0.0:
        a, c = 0.0, float((w * b * t).sum()) / float((w * b * b).sum())
    return a, c


class ArrivalRate:
    """Rows per second arriving, as an exponentially decaying count with time constant ``tau_s``.

    Decaying by elapsed time rather than per event keeps the estimate honest across gaps: after a
    quiet second the rate reads near zero, not the last burst's rate.
    """

    def __init__(self, tau_s: float = 0.5) -> None:
        self.tau_s = tau_s
        self._mass = 0.0
        self._at = 0.0

    def add(self, rows: int, now: float) -> None:
        self._mass = self._decayed(now) + rows
        self._at = max(now, self._at)

    def rate(self, now: float) -> float:
        return self._decayed(now) / self.tau_s

    def _decayed(self, now: float) -> float:
        if not self._mass:
            return 0.0
        return self._mass * math.exp(-max(now - self._at, 0.0) / self.tau_s)
