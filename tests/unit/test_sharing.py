"""Sharing the executor between models, with a fake clock: the fair-share order, then a discrete-event
simulation of two models on one worker, driven exactly as ``ml_worker.scheduler`` drives them (every
model's batcher on one ``ExecutorShare``, the ready model with the lowest virtual time first, one batch
in flight, measured costs charged back)."""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict

import numpy as np
import pytest

from ml_worker.adaptive import AdaptiveBatcher
from ml_worker.batcher import Pending
from ml_worker.sharing import ExecutorShare, FairShare

# -- the order -----------------------------------------------------------------------------------------


def test_the_model_owed_the_most_execution_goes_first_weighted() -> None:
    fair = FairShare()
    assert fair.order(["a", "b"]) == ["a", "b"]
    fair.dispatched("a", 0.010, weight=1.0)
    assert fair.order(["a", "b"]) == ["b", "a"]  # b has had nothing yet
    fair.dispatched("b", 0.010, weight=2.0)  # b's weight halves its charge
    assert fair.order(["a", "b"]) == ["b", "a"]
    fair.dispatched("b", 0.010, weight=2.0)
    assert fair.vtime("a") == pytest.approx(fair.vtime("b"))


def test_measured_cost_replaces_the_prediction() -> None:
    fair = FairShare()
    fair.dispatched("a", 0.001, weight=1.0)
    fair.correct("a", predicted_s=0.001, measured_s=0.050, weight=1.0)
    fair.dispatched("b", 0.010, weight=1.0)
    assert fair.order(["a", "b"]) == ["b", "a"]  # a's batch really took 50 ms


def test_an_idle_model_banks_no_credit() -> None:
    """A model that asked for nothing for a while re-enters at the current virtual time: otherwise it
    could take the executor for as long as it was idle, starving a model that kept working."""
    fair = FairShare()
    fair.order(["a", "b"])
    fair.dispatched("b", 0.001, weight=1.0)
    fair.went_idle("b")
    for _ in range(100):  # a runs alone for a long time
        fair.order(["a"])
        fair.dispatched("a", 0.010, weight=1.0)
    fair.order(["a", "b"])  # b comes back
    assert fair.vtime("b") >= fair.vtime("a") - 0.010 - 1e-12
    fair.dispatched("b", 0.010, weight=1.0)
    assert fair.order(["a", "b"])[0] == "a"  # one batch of b, then a again: no burst of 100


def test_the_share_knows_every_model_s_batches_and_queues() -> None:
    share = ExecutorShare()
    a, b = AdaptiveBatcher(name="a", share=share), AdaptiveBatcher(name="b", share=share)
    share.join("a", 1.0, a)
    share.join("b", 1.0, b)
    a.seed("1", {1: 0.001, 64: 0.001 + 64 * 0.0001})
    for i in range(64):
        a.offer(Pending(str(i), "1", np.zeros((1, 4), np.float32), 0.0, 1.0), 0.0)
    assert len(a.poll(0.0, True).batch) == 64
    assert share.free_at(0.0) == pytest.approx(0.0074, rel=0.01)  # b sees a's batch running
    assert b.estimated_wait_s(0.0) == pytest.approx(0.0074, rel=0.01)
    for i in range(10):
        a.offer(Pending(f"q{i}", "1", np.zeros((1, 4), np.float32), 0.0, 1.0), 0.0)
    # While b runs 1 ms of its own work, a gets at most as much of its queued 2 ms, under equal weights.
    assert share.others_backlog_s("b", 0.001) == pytest.approx(0.001)
    assert share.others_backlog_s("b", 1.0) == pytest.approx(a.backlog_s())


# -- two models on one executor -------------------------------------------------------------------------

HEAVY = (0.002, 0.0005)  # t(b) = 2 ms + 0.5 ms per row: a full batch of 64 takes 34 ms
LIGHT = (0.0002, 0.00001)
BUDGET_S = 1.0  # the app server's default request budget


def cost(model: str) -> tuple[float, float]:
    return HEAVY if model == "heavy" else LIGHT


def arrivals(rates: dict[str, float], duration: float, seed: int) -> list[tuple[float, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for model, rate in rates.items():
        t = np.cumsum(rng.exponential(1.0 / rate, int(rate * duration * 1.3) + 10))
        out += [(float(x), model) for x in t[t < duration]]
    return sorted(out)


def simulate(arrive: list[tuple[float, str]], *, fair_share: bool, seed: int = 0) -> dict[str, dict[str, list]]:
    """Replay ``arrive`` against one executor. ``fair_share``: a batcher per model and the fair order
    (today's worker). Otherwise one batcher whose queues are the models, served oldest first: what a
    worker with one queue does."""
    rng = np.random.default_rng(seed)
    share = ExecutorShare()
    fair = FairShare()
    if fair_share:
        batchers = {m: AdaptiveBatcher(name=m, share=share) for m in ("heavy", "light")}
        for m, b in batchers.items():
            share.join(m, 1.0, b)
            b.seed(m, {s: cost(m)[0] + cost(m)[1] * s for s in (1, 8, 64)})
    else:
        one = AdaptiveBatcher(share=share)
        for m in ("heavy", "light"):
            one.seed(m, {s: cost(m)[0] + cost(m)[1] * s for s in (1, 8, 64)})
        batchers = {"heavy": one, "light": one}
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    events: list = []
    seq = itertools.count()
    for i, (t, m) in enumerate(arrive):
        heapq.heappush(events, (t, next(seq), "arrive", (i, m)))
    running, timer_gen = 0, 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            i, m = payload
            p = Pending(str(i), m, np.zeros((1, 4), np.float32), now, now + BUDGET_S, model=m)
            if not batchers[m].offer(p, now):
                out[m]["overloaded"].append(0.0)
        elif kind == "done":
            batch, exec_s, m, predicted = payload
            running -= 1
            batchers[m].observe(m, len(batch), exec_s)
            fair.correct(m, predicted, exec_s, 1.0)
            for p in batch:
                out[p.model]["ok" if now <= p.deadline else "late"].append(now - p.arrival)
            if not batchers[m].depth:
                fair.went_idle(m)
        elif kind == "timer" and payload != timer_gen:
            continue
        waits = []
        ready = [m for m in ("heavy", "light") if batchers[m].depth] if fair_share else ["heavy"]
        for m in fair.order(ready) if fair_share else ready:
            poll = batchers[m].poll(now, running < 1)
            for p in poll.expired:
                out[p.model]["expired"].append(now - p.arrival)
            if poll.wait_s is not None:
                waits.append(poll.wait_s)
            if poll.batch and running < 1:
                bm = poll.batch[0].model
                a, c = cost(bm)
                exec_s = (a + c * len(poll.batch)) * float(np.clip(1 + rng.normal(0, 0.05), 0.85, 1.15))
                predicted = batchers[bm].cost(bm).predict(len(poll.batch))
                fair.dispatched(bm, predicted, 1.0)
                out[bm]["executed"].append((now, exec_s))
                running += 1
                heapq.heappush(events, (now + exec_s, next(seq), "done", (poll.batch, exec_s, bm, predicted)))
        if waits or (running == 0 and any(b.depth for b in batchers.values())):
            timer_gen += 1
            delay = max(min(waits, default=0.0002), 0.0002)
            heapq.heappush(events, (now + delay, next(seq), "timer", timer_gen))
    return out


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def test_a_flood_on_a_heavy_model_leaves_a_light_one_fast() -> None:
    """The heavy model is offered about three times what it can run; the light one a steady 100/s. With
    fair sharing the light model waits at most about one heavy batch; with one queue it waits behind
    the heavy model's whole admitted backlog, which admission lets grow to about one budget."""
    heavy_capacity = 64 / (HEAVY[0] + 64 * HEAVY[1])  # about 1,880 rows/s
    load = arrivals({"heavy": 3 * heavy_capacity, "light": 100.0}, duration=3.0, seed=1)
    fair = simulate(load, fair_share=True, seed=1)
    light, heavy = fair["light"], fair["heavy"]
    n_light = sum(1 for _, m in load if m == "light")
    assert len(light["ok"]) == n_light  # every light request answered, in time
    assert p99(light["ok"]) < 0.050
    assert max(light["ok"]) < (HEAVY[0] + 64 * HEAVY[1]) * 1.15 + 0.010  # about one heavy batch, at most
    assert len(heavy["ok"]) >= 0.8 * heavy_capacity * 3.0  # the heavy model keeps its throughput
    assert not heavy["late"] and not light["late"]

    one_queue = simulate(load, fair_share=False, seed=1)
    assert p99(one_queue["light"]["ok"]) > 0.3  # the comparison has teeth: behind the backlog


def test_two_models_under_contention_get_equal_execution_time() -> None:
    """Both flooded: each gets about half of the executor's time, whatever its cost per row."""
    load = arrivals({"heavy": 4000.0, "light": 100_000.0}, duration=1.0, seed=2)
    out = simulate(load, fair_share=True, seed=2)
    # Executor time each model got while both were flooded (after the first second neither ran dry).
    got = {m: sum(s for t, s in out[m]["executed"] if 0.2 <= t < 0.9) for m in ("heavy", "light")}
    assert got["heavy"] + got["light"] > 0.9 * 0.7  # the executor was kept busy
    assert got["heavy"] == pytest.approx(got["light"], rel=0.1)
