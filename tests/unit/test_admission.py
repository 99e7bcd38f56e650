"""The app server's admission: the AIMD concurrency limit and the loop-lag guard, on a fake clock."""

from __future__ import annotations

import pytest

from app_server.admission import Admission, AimdLimit, LoopLag, note_worker_wait
from shared.errors import Overloaded
from shared.settings import AppSettings


def limit(**kw: float) -> AimdLimit:
    return AimdLimit(**{"limit": 64, "min_limit": 4, "max_limit": 1000, "target_s": 0.05, **kw})


def feed(lim: AimdLimit, t: float, seconds: float, app_s: float, in_flight: int | None, per_s: int = 200) -> float:
    """``per_s`` samples a second of ``app_s`` each for ``seconds``, ``in_flight`` requests in progress
    (``None``: as many as the limit allows); returns the clock after."""
    n = int(seconds * per_s)
    for i in range(n):
        lim.sample(t + i / per_s, app_s, int(lim.limit) if in_flight is None else in_flight)
    return t + n / per_s


def test_slow_windows_cut_the_limit_to_its_floor_and_not_below():
    lim = limit()
    t = feed(lim, 0.0, 0.35, app_s=0.2, in_flight=64)
    assert lim.limit < 64 * 0.75 + 1e-9  # every full window over the target cuts it by a quarter
    feed(lim, t, 3.0, app_s=0.2, in_flight=64)
    assert lim.limit == 4


def test_fast_windows_raise_a_used_limit_but_not_an_idle_one():
    lim = limit()
    feed(lim, 0.0, 2.0, app_s=0.002, in_flight=2)  # far under half the limit: nothing to learn
    assert lim.limit == 64
    feed(lim, 2.0, 1.0, app_s=0.002, in_flight=40)
    assert 80 <= lim.limit < 90  # raised while 40 was at least half of it, then no more
    feed(lim, 3.0, 1.0, app_s=0.002, in_flight=None)
    assert 80 + 9 * 9 < lim.limit < 1000  # ~10 windows, each + sqrt(limit)
    feed(lim, 4.0, 30.0, app_s=0.002, in_flight=None)
    assert lim.limit == 1000


def test_a_window_needs_its_samples_before_it_moves_the_limit():
    lim = limit(min_samples=4)
    for i in range(3):
        lim.sample(i * 0.2, 1.0, 64)  # 0.6 s of windows but only three samples
    assert lim.limit == 64
    lim.sample(0.8, 1.0, 64)
    assert lim.limit == 48


def test_recovery_after_a_flood_admits_at_once_and_regrows():
    lim = limit()
    t = feed(lim, 0.0, 2.0, app_s=0.3, in_flight=64)
    assert lim.limit == 4
    # The flood stops: in-flight falls below the floor, so requests are admitted whatever the limit,
    # and with the limit in use and fast answers it grows back within a second.
    t = feed(lim, t, 1.0, app_s=0.003, in_flight=None)
    assert lim.limit > 16


def test_loop_lag_counts_an_overdue_probe_before_it_runs():
    lag = LoopLag(interval_s=0.025)
    assert lag.lag_s(100.0) == 0.0  # never ran: no lag known
    lag.woke(100.0)  # due again at 100.025
    assert lag.lag_s(100.02) == 0.0
    assert lag.lag_s(100.325) == pytest.approx(0.3)  # a stalled loop shows before the probe wakes
    lag.woke(100.325)
    assert lag.last_s == pytest.approx(0.3)
    lag.woke(100.351)
    assert lag.lag_s(100.36) == pytest.approx(0.001)  # one prompt wake and the guard lets go


def test_one_stall_alone_is_not_sustained_lag_but_two_readings_are():
    lag = LoopLag(interval_s=0.025)
    lag.woke(100.0)
    assert lag.sustained_s(100.325) == 0.0  # overdue by 0.3 s, but the last reading was prompt
    lag.woke(100.325)
    assert lag.sustained_s(100.33) == 0.0  # the stall is over when noticed: nothing refused
    assert lag.sustained_s(100.65) == pytest.approx(0.3)  # behind again while the last reading was late
    lag.woke(100.65)
    assert lag.sustained_s(100.66) == pytest.approx(0.3)


def admission(**kw: object) -> Admission:
    a = Admission.from_settings(AppSettings(**{"admission_initial_limit": 2, "admission_min_limit": 1, **kw}))
    assert a is not None
    return a


def test_admission_refuses_past_the_limit_and_admits_again_when_one_leaves():
    a = admission()
    t1, t2 = a.enter(), a.enter()
    with pytest.raises(Overloaded, match="concurrency limit") as refused:
        a.enter()
    assert refused.value.retry_after_s and refused.value.http_status == 503
    a.leave(t1)
    a.leave(t2)
    assert a.in_flight == 0
    a.leave(a.enter())


def test_admission_refuses_while_the_loop_lags():
    a = admission(admission_max_lag_ms=100)
    a.lag.last_s = a.lag.prev_s = 0.5
    with pytest.raises(Overloaded, match="event loop"):
        a.enter()
    assert a.in_flight == 0
    a.lag.last_s = 0.0
    a.leave(a.enter())


def test_worker_waits_are_not_counted_as_the_servers_own_time():
    a = admission()
    ticket = a.enter()
    note_worker_wait(0.25)
    assert ticket.waited == 0.25
    a.leave(ticket)


def test_no_admission_turns_it_off():
    assert Admission.from_settings(AppSettings(admission=False)) is None
