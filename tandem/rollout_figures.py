"""What ``tandem rollout`` compares: each variant's requests, errors and p99 over a step, and the verdict.

Figures come from the app servers' own ``/metrics`` (``tandem_variant_requests_total`` and
``tandem_variant_request_duration_seconds``, summed over every replica given, as differences between
two scrapes) or from a Prometheus server (``increase`` and ``histogram_quantile`` over the step).
:func:`decide` is a pure function from a step's figures to what to do, tested with made-up figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

REQUESTS = "tandem_variant_requests_total"
DURATION = "tandem_variant_request_duration_seconds"
VARIANTS = ("production", "canary")


@dataclass(frozen=True, slots=True)
class Guards:
    max_error_rate: float = 0.01
    """The canary's error rate above which it is rolled back."""
    max_p99_ratio: float = 1.5
    """Canary p99 over production p99 above which it is rolled back."""
    min_requests: int = 20
    """Canary requests a step needs before it is judged, and before it may end."""


@dataclass(frozen=True, slots=True)
class Figures:
    """One variant over one step."""

    requests: int = 0
    errors: int = 0
    p99_s: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(slots=True)
class Snapshot:
    """Cumulative counters of one variant, summed over the scraped app servers."""

    ok: float = 0.0
    error: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    """Upper bound -> cumulative count of answered requests."""


def decide(
    canary: Figures, production: Figures, guards: Guards, elapsed_s: float, interval_s: float
) -> tuple[str, str]:
    """``(action, why)``: ``rollback`` on a breach, ``next`` when the step has run its interval with enough
    canary traffic, else ``wait``."""
    if canary.requests >= guards.min_requests:
        if canary.error_rate > guards.max_error_rate:
            return "rollback", (
                f"canary error rate {canary.error_rate:.2%} ({canary.errors}/{canary.requests}) is above "
                f"--max-error-rate {guards.max_error_rate:.2%}"
            )
        ratio = p99_ratio(canary, production, guards)
        if ratio is not None and ratio > guards.max_p99_ratio:
            return "rollback", (
                f"canary p99 {canary.p99_s * 1000:.1f} ms is {ratio:.2f}x production's "  # type: ignore[operator]
                f"{production.p99_s * 1000:.1f} ms, above --max-p99-ratio {guards.max_p99_ratio:g}"  # type: ignore[operator]
            )
    if elapsed_s < interval_s:
        return "wait", ""
    if canary.requests < guards.min_requests:
        return "wait", f"{canary.requests} canary requests so far; {guards.min_requests} needed to judge the step"
    return "next", ""


def p99_ratio(canary: Figures, production: Figures, guards: Guards) -> float | None:
    """Canary p99 over production's, when both saw enough requests to have one."""
    if canary.p99_s is None or production.p99_s is None or production.p99_s <= 0:
        return None
    if production.requests < guards.min_requests:
        return None
    return canary.p99_s / production.p99_s


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of a cumulative histogram, interpolated inside its bucket as Prometheus'
    ``histogram_quantile`` does; ``None`` without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return bounds[-1]


def parse(text: str, model: str) -> dict[str, Snapshot]:
    """The variants' counters in one ``/metrics`` exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {v: Snapshot() for v in VARIANTS}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if labels.get("model") != model or labels.get("variant") not in out:
                continue
            snap = out[labels["variant"]]
            if s.name == REQUESTS:
                if labels.get("outcome") == "ok":
                    snap.ok += s.value
                elif labels.get("outcome") == "error":
                    snap.error += s.value
            elif s.name == f"{DURATION}_bucket":
                le = float(labels["le"])
                snap.buckets[le] = snap.buckets.get(le, 0.0) + s.value
    return out


def scrape(urls: list[str], model: str, timeout_s: float = 5.0) -> dict[str, dict[str, Snapshot]]:
    """Each app server's variant counters, by URL; a server that cannot be read is left out (said by
    the caller)."""
    import httpx

    found: dict[str, dict[str, Snapshot]] = {}
    for url in urls:
        try:
            r = httpx.get(url, timeout=timeout_s)
            r.raise_for_status()
        except httpx.HTTPError:
            continue
        found[url] = parse(r.text, model)
    return found


def step_figures(start: dict[str, dict[str, Snapshot]], now: dict[str, dict[str, Snapshot]]) -> dict[str, Figures]:
    """Each variant's figures between two scrapes, per server then summed. A server whose counters went
    down restarted: its figures count from zero."""
    totals = {v: Snapshot() for v in VARIANTS}
    for url, variants in now.items():
        before = start.get(url, {})
        for v, snap in variants.items():
            b = before.get(v, Snapshot())
            reset = snap.ok < b.ok or snap.error < b.error
            base = Snapshot() if reset else b
            t = totals[v]
            t.ok += snap.ok - base.ok
            t.error += snap.error - base.error
            for le, count in snap.buckets.items():
                t.buckets[le] = t.buckets.get(le, 0.0) + count - base.buckets.get(le, 0.0)
    return {
        v: Figures(int(t.ok + t.error), int(t.error), quantile(0.99, t.buckets) if t.ok else None)
        for v, t in totals.items()
    }


def prometheus_figures(url: str, model: str, window_s: float, timeout_s: float = 5.0) -> dict[str, Figures]:
    """The same figures from a Prometheus server, over the last ``window_s`` seconds (every replica it
    scrapes, restarts handled by ``increase``)."""
    import httpx

    window = f"{max(int(window_s), 1)}s"
    sel = f'model="{model}"'

    def query(expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": expr}, timeout=timeout_s)
        r.raise_for_status()
        return r.json()["data"]["result"]

    counts = query(f"sum by (variant, outcome) (increase({REQUESTS}{{{sel}}}[{window}]))")
    p99 = query(f"histogram_quantile(0.99, sum by (variant, le) (increase({DURATION}_bucket{{{sel}}}[{window}])))")
    out: dict[str, Figures] = {}

    def total(variant: str, outcome: str) -> float:
        m = [r for r in counts if r["metric"].get("variant") == variant and r["metric"].get("outcome") == outcome]
        return sum(float(r["value"][1]) for r in m)

    for v in VARIANTS:
        ok, err = total(v, "ok"), total(v, "error")
        q = next((float(r["value"][1]) for r in p99 if r["metric"].get("variant") == v), None)
        out[v] = Figures(round(ok + err), round(err), q if q is not None and math.isfinite(q) else None)
    return out
