"""The rollout controller's verdicts and figures, with made-up numbers."""

from __future__ import annotations

import pytest

from tandem.rollout_figures import Figures, Guards, Snapshot, decide, parse, quantile, step_figures

G = Guards(max_error_rate=0.01, max_p99_ratio=1.5, min_requests=20)
HEALTHY = Figures(100, 0, 0.004)
PROD = Figures(1000, 1, 0.004)


@pytest.mark.parametrize(
    ("canary", "elapsed", "action"),
    [
        (HEALTHY, 5, "wait"),  # within the interval
        (HEALTHY, 60, "next"),
        (Figures(100, 30, 0.004), 5, "rollback"),  # 30% errors: at once, not at the interval's end
        (Figures(100, 1, 0.004), 60, "next"),  # exactly 1% is within --max-error-rate 0.01
        (Figures(100, 2, 0.004), 60, "rollback"),
        (Figures(100, 0, 0.0061), 5, "rollback"),  # p99 1.53x production's
        (Figures(100, 0, 0.0059), 60, "next"),
        (Figures(10, 5, 0.1), 5, "wait"),  # too few requests to judge either way
        (Figures(10, 0, 0.004), 60, "wait"),  # and too few to end the step
    ],
)
def test_decide(canary, elapsed, action):
    assert decide(canary, PROD, G, elapsed, 60)[0] == action


def test_rollback_says_why():
    action, why = decide(Figures(100, 30, 0.004), PROD, G, 1, 60)
    assert action == "rollback" and "30.00%" in why and "--max-error-rate" in why


def test_p99_not_judged_without_enough_production_traffic():
    assert decide(Figures(100, 0, 0.1), Figures(5, 0, 0.001), G, 60, 60)[0] == "next"


def test_quantile_interpolates_like_prometheus():
    buckets = {0.001: 0, 0.002: 50, 0.005: 100, float("inf"): 100}
    assert quantile(0.5, buckets) == pytest.approx(0.002)
    assert quantile(0.99, buckets) == pytest.approx(0.002 + 0.003 * 49 / 50)
    assert quantile(0.99, {0.001: 0, float("inf"): 0}) is None


EXPOSITION = """
tandem_variant_requests_total{model="demo",variant="canary",outcome="ok"} %d
tandem_variant_requests_total{model="demo",variant="canary",outcome="error"} %d
tandem_variant_requests_total{model="demo",variant="production",outcome="ok"} %d
tandem_variant_requests_total{model="other",variant="canary",outcome="error"} 99
tandem_variant_request_duration_seconds_bucket{model="demo",variant="canary",le="0.005"} %d
tandem_variant_request_duration_seconds_bucket{model="demo",variant="canary",le="+Inf"} %d
"""


def test_step_figures_are_differences_and_survive_a_restart():
    before = {"a": parse(EXPOSITION % (10, 1, 100, 10, 10), "demo")}
    before["b"] = parse(EXPOSITION % (50, 0, 10, 50, 50), "demo")
    after = {"a": parse(EXPOSITION % (40, 4, 300, 40, 40), "demo"), "b": parse(EXPOSITION % (5, 1, 3, 5, 5), "demo")}
    f = step_figures(before, after)
    # a: 30 ok + 3 errors; b restarted (counters went down): 5 ok + 1 error from zero
    assert (f["canary"].requests, f["canary"].errors) == (39, 4)
    assert f["production"].requests == 203
    assert f["canary"].p99_s is not None and f["canary"].p99_s <= 0.005


def test_parse_ignores_other_models():
    snap = parse(EXPOSITION % (1, 2, 3, 1, 1), "demo")
    assert isinstance(snap["canary"], Snapshot) and snap["canary"].error == 2
