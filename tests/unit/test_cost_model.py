"""The online cost model and the arrival-rate estimate, on synthetic timings."""

from __future__ import annotations

import numpy as np
import pytest

from ml_worker.cost_model import ArrivalRate, CostModel

A, C = 0.002, 0.0001  # 2 ms + 0.1 ms per row


def true_t(b: int) -> float:
    return A + C * b


def test_recovers_an_exact_line() -> None:
    model = CostModel()
    for b in (1, 8, 16, 32, 64) * 4:
        model.observe(b, true_t(b))
    assert model.a == pytest.approx(A, rel=0.02)
    assert model.c == pytest.approx(C, rel=0.02)
    assert model.predict(10) == pytest.approx(true_t(10), rel=0.02)


def test_converges_under_noise_and_ignores_outliers() -> None:
    rng = np.random.default_rng(7)
    model = CostModel(window=128)
    for i in range(400):
        b = int(rng.integers(1, 65))
        t = true_t(b) * (1 + rng.normal(0, 0.05))
        if i % 40 == 0:
            t *= 10  # a GC pause or a stolen core
        model.observe(b, t)
    assert model.a == pytest.approx(A, rel=0.10)
    assert model.c == pytest.approx(C, rel=0.10)
    # The deviation reflects the 5 % noise, not the 10x outliers.
    assert model.sigma < 0.1 * true_t(32)


def test_seed_gives_the_slope_while_traffic_is_all_one_size() -> None:
    model = CostModel()
    model.seed({b: true_t(b) for b in (1, 2, 4, 8, 16, 32, 64)})
    assert model.seeded
    assert model.predict(64) == pytest.approx(true_t(64), rel=0.02)
    # Live single-row batches cost more than warm-up said (e.g. thread hand-off); only b=1 is seen.
    for _ in range(100):
        model.observe(1, true_t(1) + 0.0005)
    assert model.predict(1) == pytest.approx(true_t(1) + 0.0005, rel=0.05)
    assert model.c == pytest.approx(C, rel=0.5)  # the slope survives, not collapsed to zero


def test_follows_a_slower_device_within_one_window() -> None:
    model = CostModel(window=64)
    model.seed({b: true_t(b) for b in (1, 8, 64)})
    for i in range(64):
        b = 1 + (i * 7) % 64
        model.observe(b, 2 * true_t(b))
    assert model.predict(32) == pytest.approx(2 * true_t(32), rel=0.05)


@pytest.mark.parametrize(
    "points",
    [
        [(1, 0.003), (64, 0.001)],  # decreasing with size: slope clamped to 0
        [(1, 1e-6), (64, 0.0064)],  # steep through the origin: intercept clamped to 0
        [(5, 1e-9)] * 20,  # absurdly fast
    ],
)
def test_never_predicts_zero_or_less(points: list[tuple[int, float]]) -> None:
    model = CostModel(prior=(0.0, 0.0))
    for b, t in points * 5:
        model.observe(b, t)
    assert model.a >= 0 and model.c >= 0
    assert all(model.predict(b) > 0 for b in (0, 1, 64, 1000))
    assert model.upper(8) > model.predict(8)


def test_rejects_garbage_observations() -> None:
    model = CostModel()
    for rows, seconds in [(0, 0.01), (4, -1.0), (4, float("nan")), (4, float("inf"))]:
        model.observe(rows, seconds)
    assert model.n_observed == 0


def test_arrival_rate_tracks_and_decays() -> None:
    rate = ArrivalRate(tau_s=0.5)
    t = 0.0
    for _ in range(5000):  # 1000 rows/s for 5 s: many time constants
        t += 0.001
        rate.add(1, t)
    assert rate.rate(t) == pytest.approx(1000, rel=0.02)
    assert rate.rate(t + 3.0) < 1000 * 0.01  # a quiet stretch reads as quiet
