"""The adaptive batcher with a fake clock: unit behaviour, then a discrete-event simulation of a model.

The simulation drives the batcher exactly as ``ml_worker.server`` does (offer on arrival, poll after
every event and when ``wait_s`` elapses, at most ``in_flight`` batches running, observe on completion)
against a model whose batch of ``b`` rows takes ``2 ms + 0.1 ms·b`` plus noise. Everything is seeded.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest

from ml_worker.adaptive import AdaptiveBatcher
from ml_worker.batcher import Pending, SimpleBatcher
from ml_worker.cost_model import ArrivalRate

A, C = 0.002, 0.0001
MS = 0.001


def req(i: int | str, now: float, budget_s: float = 0.05, rows: int = 1, version: str = "1") -> Pending:
    return Pending(str(i), version, np.zeros((rows, 4), np.float32), now, now + budget_s)


def flood(b: AdaptiveBatcher, version: str = "1") -> None:
    """Make the batcher believe a million rows just arrived for ``version``: it holds until full."""
    b._rate.add(10**6, 0.0)
    b._vrates.setdefault(version, ArrivalRate(b._rate_tau_s)).add(10**6, 0.0)


def seeded(**kw: float) -> AdaptiveBatcher:
    b = AdaptiveBatcher(**kw)
    b.seed("1", {s: A + C * s for s in (1, 2, 4, 8, 16, 32, 64)})
    return b


# -- unit behaviour ----------------------------------------------------------------------------------


def test_lone_request_at_low_load_runs_at_once() -> None:
    b = seeded()
    assert b.offer(req(0, 0.0), 0.0)
    assert [p.msg_id for p in b.poll(0.0, True).batch] == ["0"]
    assert b.depth == 0


def test_holds_for_company_at_high_rate_until_the_window_closes() -> None:
    b = seeded(max_latency_s=0.010)
    t = 0.0
    for i in range(4000):  # 4000 rows/s for 1 s (two rate time constants), dispatched as they come
        t = i * 0.00025
        b.offer(req(f"w{i}", t), t)
        b.poll(t, True)
        b.observe("1", 1, A + C)
    for i in range(4000):  # start from an empty queue: only the rate estimate carries over
        b.cancel(f"w{i}")
    assert b.depth == 0
    t0 = t + 0.001
    b.offer(req("x", t0), t0)
    poll = b.poll(t0, True)
    assert not poll.batch  # at this rate b* > 1: wait for company...
    assert poll.wait_s == pytest.approx(0.010)  # ...but only until the window closes
    assert b.poll(t0 + 0.005, True).batch == []
    assert [p.msg_id for p in b.poll(t0 + 0.010, True).batch] == ["x"]


def test_dispatches_when_full() -> None:
    b = seeded(max_batch_size=8, max_latency_s=1.0)
    flood(b)  # hold until full
    for i in range(7):
        b.offer(req(i, 0.0, budget_s=1.0), 0.0)
    assert b.poll(0.0, True).batch == []
    b.offer(req(7, 0.0, budget_s=1.0), 0.0)
    assert len(b.poll(0.0, True).batch) == 8


def test_deadline_forces_dispatch_before_the_window() -> None:
    b = seeded(max_latency_s=1.0, margin_s=0.001)
    flood(b)
    b.offer(req("tight", 0.0, budget_s=0.010), 0.0)
    poll = b.poll(0.0, True)
    assert not poll.batch
    latest = 0.010 - b.cost("1").upper(1) - 0.001
    assert poll.wait_s == pytest.approx(latest)
    assert b.poll(latest - 1e-4, True).batch == []
    assert len(b.poll(latest, True).batch) == 1


def test_batch_keeps_growing_while_the_executor_is_busy() -> None:
    b = seeded(max_latency_s=0.001)
    for i in range(20):
        b.offer(req(i, i * 0.001, budget_s=1.0), i * 0.001)
        assert b.poll(i * 0.001, False).batch == []
    assert b.depth == 20
    assert [p.msg_id for p in b.poll(0.02, True).batch] == [str(i) for i in range(20)]


def test_batches_hold_one_version_and_oldest_goes_first() -> None:
    b = seeded()
    for i, v in enumerate("1212"):
        b.offer(req(i, 0.0, version=v), 0.0)
    first = b.poll(0.0, True).batch
    second = b.poll(0.0, True).batch
    assert [p.msg_id for p in first] == ["0", "2"] and [p.msg_id for p in second] == ["1", "3"]


def test_request_larger_than_max_batch_runs_alone() -> None:
    b = seeded(max_batch_size=8)
    b.offer(req("small", 0.0, rows=2, budget_s=1.0), 0.0)
    b.offer(req("big", 0.0, rows=20, budget_s=1.0), 0.0)
    b.offer(req("small2", 0.0, rows=2, budget_s=1.0), 0.0)
    assert [p.msg_id for p in b.poll(0.0, True).batch] == ["small", "small2"]
    assert [p.msg_id for p in b.poll(0.0, True).batch] == ["big"]


def test_cancel_removes_a_queued_request() -> None:
    b = seeded()
    for i in range(3):
        b.offer(req(i, 0.0), 0.0)
    assert b.cancel("1")
    assert not b.cancel("1") and not b.cancel("nope")
    assert b.depth == 2
    assert [p.msg_id for p in b.poll(0.0, True).batch] == ["0", "2"]


def test_expired_requests_are_never_run() -> None:
    b = seeded()
    b.offer(req("a", 0.0, budget_s=0.02), 0.0)
    b.offer(req("b", 0.0, budget_s=0.5), 0.0)
    poll = b.poll(0.021, False)  # executor busy past a's deadline
    assert [p.msg_id for p in poll.expired] == ["a"]
    assert b.depth == 1
    assert [p.msg_id for p in b.poll(0.03, True).batch] == ["b"]


def test_request_that_cannot_make_it_any_more_is_expired_not_run_late() -> None:
    b = seeded()
    b.offer(req("a", 0.0, budget_s=0.010), 0.0)
    # 9 ms later its deadline has not passed, but 1 ms is less than one execution (2.1 ms).
    poll = b.poll(0.009, True)
    assert [p.msg_id for p in poll.expired] == ["a"] and not poll.batch


def test_busy_executor_wakes_the_server_when_the_head_would_expire() -> None:
    b = seeded()
    b.offer(req("a", 0.0, budget_s=0.020), 0.0)
    poll = b.poll(0.0, False)
    assert poll.wait_s == pytest.approx(0.020 - b.cost("1").upper(1))


def test_admission_refuses_what_cannot_finish_in_its_budget() -> None:
    b = seeded(max_batch_size=64)
    for i in range(640):  # ten full batches ahead: about 84 ms of work
        assert b.offer(req(i, 0.0, budget_s=10.0), 0.0)
    assert b.estimated_wait_s(0.0) == pytest.approx(10 * (A + 64 * C), rel=0.05)
    assert not b.offer(req("hopeless", 0.0, budget_s=0.001), 0.0)  # less than one execution
    assert not b.offer(req("late", 0.0, budget_s=0.050), 0.0)
    assert b.offer(req("patient", 0.0, budget_s=0.200), 0.0)


def test_an_idle_worker_probes_instead_of_refusing_for_good_after_a_stall() -> None:
    """Refused requests never run, so only a probe can tell the cost model a stall is over."""
    b = seeded()
    assert b.offer(req("first", 0.0), 0.0) and b.poll(0.0, True).batch
    b.observe("1", 1, 0.5)  # the first live batch stalled: the model now predicts ~0.1 s per call
    t = 1.0
    assert b.cost("1").upper(1) > 0.1
    assert b.offer(req("probe", t, budget_s=0.1), t)  # idle, nothing queued: admitted anyway
    assert not b.offer(req("behind", t, budget_s=0.1), t)  # not idle any more: refused on the estimate
    poll = b.poll(t, True)
    assert [p.msg_id for p in poll.batch] == ["probe"] and not poll.expired  # run, not expired on the estimate
    b.observe("1", 1, A + C)
    for i in range(8):  # probes keep coming while the estimate is wrong, and each one corrects it
        t += 0.1
        if b.cost("1").upper(1) <= 0.1:
            break
        assert b.offer(req(f"p{i}", t, budget_s=0.1), t)
        assert b.poll(t, True).batch
        b.observe("1", 1, A + C)
    assert b.cost("1").upper(1) < 0.1
    assert b.offer(req("busy", t, budget_s=10.0), t) and b.offer(req("normal", t, budget_s=0.1), t)


def test_probes_go_only_to_an_idle_worker_and_at_most_once_per_interval() -> None:
    b = seeded(probe_interval_s=0.1)
    assert b.offer(req("ahead", 0.0, budget_s=1.0), 0.0)  # one request queued ahead
    assert not b.offer(req("hopeless", 0.0, budget_s=0.001), 0.0)  # something is queued: no probe
    b.poll(0.0, True)  # "ahead" starts: the executor is busy until about 2.1 ms
    assert not b.offer(req("hopeless", 0.001, budget_s=0.001), 0.001)  # busy: no probe
    assert b.offer(req("probe", 0.01, budget_s=0.001), 0.01)  # idle and empty: a probe
    assert b.poll(0.01, True).batch
    assert not b.offer(req("soon", 0.05, budget_s=0.001), 0.05)  # idle, but 40 ms after the last probe
    assert b.offer(req("later", 0.2, budget_s=0.001), 0.2)


def test_admission_bounds_the_queue_in_rows() -> None:
    b = seeded(max_queue=10)
    assert b.offer(req("a", 0.0, rows=8, budget_s=1.0), 0.0)
    assert not b.offer(req("b", 0.0, rows=3, budget_s=1.0), 0.0)
    assert b.offer(req("c", 0.0, rows=2, budget_s=1.0), 0.0)
    assert b.depth == 10


def test_running_batch_counts_in_the_estimated_wait() -> None:
    b = seeded()
    for i in range(64):
        b.offer(req(i, 0.0, budget_s=1.0), 0.0)
    assert len(b.poll(0.0, True).batch) == 64
    assert b.estimated_wait_s(0.001) == pytest.approx(A + 64 * C - 0.001, rel=0.01)
    b.observe("1", 64, A + 64 * C)
    assert b.estimated_wait_s(0.0085) == 0.0


# -- simulation --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    arrival: float
    deadline: float
    status: str = ""
    done: float = 0.0
    exec_s: float = 0.0


@dataclass
class SimResult:
    out: dict[str, Outcome] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.out.values())

    def ok_latencies(self) -> np.ndarray:
        return np.array([o.done - o.arrival for o in self.out.values() if o.status == "ok"])


def simulate(batcher, arrivals: np.ndarray, *, budget_s: float = 0.05, seed: int = 0, in_flight: int = 1):
    """Event-driven replay of the worker's dispatch loop against ``t(b) = A + C·b`` with 5 % noise."""
    rng = np.random.default_rng(seed)
    res = SimResult()
    events: list[tuple[float, int, str, object]] = []
    seq = itertools.count()
    for i, t in enumerate(arrivals):
        heapq.heappush(events, (float(t), next(seq), "arrive", i))
    running = 0
    timer_gen = 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            p = req(payload, now, budget_s)
            res.out[p.msg_id] = Outcome(now, p.deadline)
            if not batcher.offer(p, now):
                res.out[p.msg_id].status = "overloaded"
                res.out[p.msg_id].done = now
        elif kind == "done":
            batch, exec_s = payload
            running -= 1
            batcher.observe("1", sum(p.rows for p in batch), exec_s)
            for p in batch:
                o = res.out[p.msg_id]
                o.status, o.done, o.exec_s = "ok", now, exec_s
        elif kind == "timer" and payload != timer_gen:
            continue
        while True:  # the server's dispatch loop
            poll = batcher.poll(now, running < in_flight)
            for p in poll.expired:
                res.out[p.msg_id].status, res.out[p.msg_id].done = "expired", now
            if poll.batch:
                rows = sum(p.rows for p in poll.batch)
                exec_s = (A + C * rows) * float(np.clip(1 + rng.normal(0, 0.05), 0.85, 1.15))
                running += 1
                res.batches.append(rows)
                heapq.heappush(events, (now + exec_s, next(seq), "done", (poll.batch, exec_s)))
                continue
            if poll.wait_s is not None:
                timer_gen += 1
                heapq.heappush(events, (now + max(poll.wait_s, 0.0002), next(seq), "timer", timer_gen))
            break
    assert all(o.status for o in res.out.values()), "every request gets exactly one answer"
    return res


CAPACITY = 64 / (A + 64 * C)  # rows/s at full batches: about 7,600


def constant(rate: float, duration: float) -> np.ndarray:
    return np.arange(0.0, duration, 1.0 / rate)


def poisson(rate: float, duration: float, seed: int) -> np.ndarray:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, int(rate * duration * 1.2) + 10)
    t = np.cumsum(gaps)
    return t[t < duration]


def on_off(rate_on: float, on_s: float, off_s: float, duration: float) -> np.ndarray:
    t = constant(rate_on, duration)
    return t[(t % (on_s + off_s)) < on_s]


def assert_deadlines_met(res: SimResult) -> None:
    late = [k for k, o in res.out.items() if o.status == "ok" and o.done > o.deadline]
    assert not late, f"{len(late)} admitted requests finished after their deadline"


def test_low_load_adds_almost_no_latency() -> None:
    res = simulate(seeded(max_latency_s=0.010), poisson(50, 4.0, seed=1), seed=1)
    assert res.count("ok") == len(res.out)
    waits = np.array([o.done - o.arrival - o.exec_s for o in res.out.values()])
    assert waits.max() <= 0.010  # never more than the window
    assert np.median(waits) < 0.0005  # and in practice none: a lone request runs at once


@pytest.mark.parametrize("pattern", ["constant", "poisson"])
def test_moderate_load_meets_every_deadline_without_shedding(pattern: str) -> None:
    rate = 0.6 * CAPACITY
    arrivals = constant(rate, 0.5) if pattern == "constant" else poisson(rate, 0.5, seed=2)
    res = simulate(seeded(), arrivals, seed=2)
    assert_deadlines_met(res)
    assert res.count("ok") == len(res.out)
    assert np.percentile(res.ok_latencies(), 99) < 0.025
    assert np.mean(res.batches) > 4  # batching happened


def test_past_capacity_sheds_at_the_door_instead_of_timing_out() -> None:
    arrivals = constant(1.6 * CAPACITY, 0.6)
    res = simulate(seeded(), arrivals, seed=3)
    assert_deadlines_met(res)
    n = len(res.out)
    assert res.count("expired") <= 0.01 * n
    assert res.count("overloaded") >= 0.25 * n
    assert res.count("ok") / 0.6 >= 0.85 * CAPACITY  # throughput held near the ceiling
    # The same load through the fixed batcher turns into timeouts: the comparison has teeth.
    simple = simulate(SimpleBatcher(), arrivals, seed=3)
    assert simple.count("expired") >= 0.2 * n


def test_bursty_on_off_arrivals_meet_deadlines() -> None:
    arrivals = on_off(3 * CAPACITY, on_s=0.02, off_s=0.06, duration=0.8)  # mean 0.75x capacity
    res = simulate(seeded(), arrivals, seed=4)
    assert_deadlines_met(res)
    n = len(res.out)
    assert res.count("expired") <= 0.01 * n
    assert res.count("ok") >= 0.9 * n
    assert np.percentile(res.ok_latencies(), 99) <= 0.05


def test_cost_model_converges_from_a_wrong_start_under_load() -> None:
    b = AdaptiveBatcher()
    b.seed("1", {s: 3 * (A + C * s) for s in (1, 8, 64)})  # warm-up was 3x too pessimistic
    simulate(b, poisson(0.7 * CAPACITY, 0.6, seed=5), seed=5)
    assert b.cost("1").a == pytest.approx(A, rel=0.15)
    assert b.cost("1").c == pytest.approx(C, rel=0.15)


def test_two_batches_in_flight() -> None:
    res = simulate(seeded(), poisson(0.6 * CAPACITY, 0.3, seed=6), seed=6, in_flight=2)
    assert_deadlines_met(res)
    assert res.count("ok") == len(res.out)


def test_slipped_head_is_dropped_rather_than_run_in_a_one_row_batch() -> None:
    b = seeded()
    # The head has 4 ms left: enough to run alone (2.1 ms) but not with 63 others (8.4 ms).
    b.offer(req("head", 0.0, budget_s=0.5), 0.0)
    for i in range(63):
        b.offer(req(i, 0.0, budget_s=1.0), 0.0)
    poll = b.poll(0.496, True)
    assert [p.msg_id for p in poll.expired] == ["head"]
    assert len(poll.batch) == 63


def test_seed_is_idempotent_and_new_versions_inherit_the_last_line() -> None:
    b = seeded()
    b.seed("1", {1: 1.0, 64: 2.0})  # already seeded: ignored
    assert b.cost("1").predict(64) == pytest.approx(A + 64 * C, rel=0.05)
    for _ in range(20):
        b.observe("1", 32, 2 * (A + 32 * C))
    inherited = b.cost("2")  # no warm-up seen for v2 yet: start from v1's current line
    assert inherited.predict(32) == pytest.approx(b.cost("1").predict(32), rel=0.01)
    b.seed("2", {s: A + C * s for s in (1, 8, 64)})  # the inherited prior gives way to warm-up
    assert b.cost("2").predict(32) == pytest.approx(A + 32 * C, rel=0.05)


def test_cost_models_of_retired_versions_are_forgotten() -> None:
    b = seeded(max_versions=2)
    for v in "2345":
        b.offer(req(v, 0.0, version=v), 0.0)
        b.poll(0.0, True)
        b.observe(v, 1, A + C)
    assert len(b._costs) <= 2


@pytest.mark.parametrize("make", [seeded, SimpleBatcher])
def test_take_all_empties_the_queue_in_arrival_order(make) -> None:
    b = make()
    for i, (t, v) in enumerate([(0.0, "1"), (0.001, "2"), (0.002, "1")]):
        assert b.offer(req(f"r{i}", t, budget_s=1.0, version=v), t)
    b.cancel("r1")
    assert [p.msg_id for p in b.take_all()] == ["r0", "r2"]
    assert b.depth == 0
    poll = b.poll(0.003, True)
    assert not poll.batch and not poll.expired
    assert b.offer(req("again", 0.004), 0.004) and [p.msg_id for p in b.poll(0.004, True).batch] == ["again"]
