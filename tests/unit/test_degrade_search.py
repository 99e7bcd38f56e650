"""What counts as a held step in the graceful-degradation search (loadtest/degrade.py)."""

from __future__ import annotations

from loadtest.degrade import held


def step(p99: float | None = 40.0, sent: int = 1000, **errors: int) -> dict:
    return {"p99_ms": p99, "sent": sent, "errors": {k.removeprefix("s"): v for k, v in errors.items()}}


def test_a_clean_step_within_the_slo_is_held() -> None:
    assert held(step(), slo_ms=500)
    assert not held(step(p99=501.0), slo_ms=500)
    assert not held(step(p99=None), slo_ms=500)  # nothing answered


def test_the_odd_refusal_is_held_but_timeouts_and_other_errors_never_are() -> None:
    assert held(step(s503=10), slo_ms=500)  # 1% of the step
    assert not held(step(s503=11), slo_ms=500)
    assert not held(step(timeout=1), slo_ms=500)
    assert not held(step(s504=1), slo_ms=500)
    assert not held(step(connect=1), slo_ms=500)
