"""Graceful degradation: find the rate a stack holds, then offer it 1.5x and 3x that and see what it keeps.

A server that sheds at the door keeps answering close to its maximum when offered more, and refuses
the rest quickly; one that queues in its backlog loses throughput to requests that time out anyway, and
its callers see timeouts instead of 503s. The held maximum is searched, not assumed: geometric steps of
open-loop load (Poisson arrivals) until a step is not held: a client timeout or an error other than a
503, more than 1% of its requests refused, or a p99 over ``slo_ms``. A few 503s are allowed because a
server that sheds at the door refuses the odd request in a burst of Poisson arrivals on a busy machine,
and one such step should not end the search far below what the server holds. The maximum is the rate
of 200s in the last held step, the figure the overload steps are compared with.

Used by ``python -m loadtest.scenarios degrade`` and by the end-to-end test of the same name.
"""

from __future__ import annotations

from typing import Any

from loadtest import openloop

CLIENT_TIMEOUT_MS = 1000
"""The callers' timeout: an answer later than this is a client timeout, whatever its status."""


REFUSED_SHARE = 0.01
"""The share of a step's requests that may be 503s and the step still count as held."""


def held(step: dict[str, Any], slo_ms: float) -> bool:
    errors = dict(step["errors"])
    refused = errors.pop("503", 0)
    within = step["p99_ms"] is not None and step["p99_ms"] <= slo_ms
    return not errors and refused <= REFUSED_SHARE * step["sent"] and within


def offer(url: str, body: bytes, rate: float, seconds: float) -> dict[str, Any]:
    """One open-loop step at a 1 s client timeout, with connections enough for every request in flight
    for the whole timeout (a smaller pool would report the generator's own queue as timeouts)."""
    r = openloop.run(
        f"{url}/predict",
        body,
        rate,
        seconds,
        poisson=True,
        timeout_ms=CLIENT_TIMEOUT_MS,
        max_connections=int(rate) + 64,
    )
    keys = ("rate", "sent", "ok", "throughput", "p50_ms", "p99_ms", "refused_p99_ms", "client_cpu_pct")
    return {**{k: r[k] for k in keys}, "errors": r["errors"], "timeouts": r["errors"].get("timeout", 0)}


def held_max(
    url: str, body: bytes, *, start: float, factor: float = 1.25, seconds: float = 4.0, slo_ms: float = 500.0
) -> tuple[float, list[dict[str, Any]]]:
    """The rate of 200s in the highest held step, and every step (at most 20: bounded whatever the box)."""
    steps: list[dict[str, Any]] = []
    best, rate = 0.0, start
    for _ in range(20):
        step = offer(url, body, rate, seconds)
        steps.append(step)
        if not held(step, slo_ms):
            break
        best = step["throughput"]
        rate *= factor
    return best, steps


def past_max(url: str, body: bytes, maximum: float, *, seconds: float = 10.0) -> dict[str, Any]:
    """Offered 1.5x and 3x ``maximum``: each step's 200s as a share of the maximum, its refusals and how
    long they took, and its client timeouts."""
    out: dict[str, Any] = {}
    for times in (1.5, 3.0):
        step = offer(url, body, maximum * times, seconds)
        step["ok_rate_over_max"] = round(step["throughput"] / maximum, 3) if maximum else None
        out[f"x{times:g}"] = step
    return out


def degrade(url: str, body: bytes, *, start: float, search_s: float = 4.0, overload_s: float = 10.0) -> dict[str, Any]:
    maximum, steps = held_max(url, body, start=start, seconds=search_s)
    return {"held_max": maximum, "search": steps, **past_max(url, body, maximum, seconds=overload_s)}
